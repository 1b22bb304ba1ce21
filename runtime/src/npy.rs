//! Minimal `.npy` (NumPy array file) reader and writer: little-endian numeric dtypes, C order.
//!
//! Used for test fixtures made by the Python tools and for `run --logits-out`. The format is
//! NumPy's `lib/format.py`: magic `\x93NUMPY`, version, a header length (u16 in v1, u32 in v2/v3),
//! a Python-dict header `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`, then raw data.

use std::io::Write;
use std::path::Path;

/// Element types the reader understands (NumPy `descr` strings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F16,
    F32,
    F64,
    U8,
    I8,
    U16,
    I32,
    I64,
    Bool,
}

impl Dtype {
    fn from_descr(d: &str) -> Option<Dtype> {
        Some(match d {
            "<f2" => Dtype::F16,
            "<f4" => Dtype::F32,
            "<f8" => Dtype::F64,
            "|u1" | "<u1" => Dtype::U8,
            "|i1" | "<i1" => Dtype::I8,
            "<u2" => Dtype::U16,
            "<i4" => Dtype::I32,
            "<i8" => Dtype::I64,
            "|b1" => Dtype::Bool,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::U8 | Dtype::I8 | Dtype::Bool => 1,
            Dtype::F16 | Dtype::U16 => 2,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F64 | Dtype::I64 => 8,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: not a .npy file: {what}")]
    Format { path: String, what: String },
    #[error("{path}: dtype {got:?}, expected {expected}")]
    Dtype { path: String, got: Dtype, expected: &'static str },
}

/// A loaded array: shape (C order) and raw little-endian element bytes.
#[derive(Clone, Debug)]
pub struct Npy {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
    path: String,
}

impl Npy {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn want(&self, expected: &'static str, ok: bool) -> Result<(), NpyError> {
        if ok {
            Ok(())
        } else {
            Err(NpyError::Dtype { path: self.path.clone(), got: self.dtype, expected })
        }
    }

    /// Elements as f32 (f16, f32 and f64 arrays convert; f64 rounds).
    pub fn to_f32(&self) -> Result<Vec<f32>, NpyError> {
        self.want("a float array", matches!(self.dtype, Dtype::F16 | Dtype::F32 | Dtype::F64))?;
        Ok(match self.dtype {
            Dtype::F16 => self.data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F32 => self.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            _ => self.to_f64()?.into_iter().map(|v| v as f32).collect(),
        })
    }

    /// Elements as f64 (any float array).
    pub fn to_f64(&self) -> Result<Vec<f64>, NpyError> {
        self.want("a float array", matches!(self.dtype, Dtype::F16 | Dtype::F32 | Dtype::F64))?;
        Ok(match self.dtype {
            Dtype::F64 => self.data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk"))).collect(),
            _ => self.to_f32()?.into_iter().map(f64::from).collect(),
        })
    }

    /// Elements as i64 (any integer or bool array).
    pub fn to_i64(&self) -> Result<Vec<i64>, NpyError> {
        let d = &self.data;
        Ok(match self.dtype {
            Dtype::U8 | Dtype::Bool => d.iter().map(|v| *v as i64).collect(),
            Dtype::I8 => d.iter().map(|v| *v as i8 as i64).collect(),
            Dtype::U16 => d.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as i64).collect(),
            Dtype::I32 => d.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect(),
            Dtype::I64 => d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8-byte chunk"))).collect(),
            _ => return Err(NpyError::Dtype { path: self.path.clone(), got: self.dtype, expected: "an integer array" }),
        })
    }

    /// Raw bytes of a uint8 array.
    pub fn bytes(&self) -> Result<&[u8], NpyError> {
        self.want("uint8", self.dtype == Dtype::U8)?;
        Ok(&self.data)
    }
}

fn format_err(path: &str, what: impl Into<String>) -> NpyError {
    NpyError::Format { path: path.to_string(), what: what.into() }
}

/// Reads a `.npy` file.
pub fn read(path: impl AsRef<Path>) -> Result<Npy, NpyError> {
    let p = path.as_ref().display().to_string();
    let raw = std::fs::read(path.as_ref()).map_err(|source| NpyError::Io { path: p.clone(), source })?;
    parse(&raw, &p)
}

fn parse(raw: &[u8], p: &str) -> Result<Npy, NpyError> {
    if raw.len() < 10 || &raw[..6] != b"\x93NUMPY" {
        return Err(format_err(p, "missing \\x93NUMPY magic"));
    }
    let (header_len, start) = match raw[6] {
        1 => (u16::from_le_bytes([raw[8], raw[9]]) as usize, 10usize),
        2 | 3 if raw.len() >= 12 => (u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]) as usize, 12),
        v => return Err(format_err(p, format!("unsupported version {v}"))),
    };
    let header_end =
        start.checked_add(header_len).filter(|e| *e <= raw.len()).ok_or_else(|| format_err(p, "header runs past the end"))?;
    let header = std::str::from_utf8(&raw[start..header_end]).map_err(|_| format_err(p, "header is not UTF-8"))?;
    let descr = dict_value(header, "descr").ok_or_else(|| format_err(p, "no 'descr' in header"))?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let dtype = Dtype::from_descr(descr).ok_or_else(|| format_err(p, format!("unsupported dtype '{descr}'")))?;
    if dict_value(header, "fortran_order").map(|v| v.starts_with("True")).unwrap_or(false) {
        return Err(format_err(p, "Fortran-order arrays are not supported"));
    }
    let shape_str = dict_value(header, "shape").ok_or_else(|| format_err(p, "no 'shape' in header"))?;
    let inner = shape_str.trim_start_matches('(');
    let inner = &inner[..inner.find(')').ok_or_else(|| format_err(p, "unterminated shape"))?];
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format_err(p, format!("bad shape entry '{s}'"))))
        .collect::<Result<_, _>>()?;
    let n = shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d)).ok_or_else(|| format_err(p, "shape overflows"))?;
    let nbytes = n.checked_mul(dtype.size()).ok_or_else(|| format_err(p, "shape overflows"))?;
    if raw.len() - header_end != nbytes {
        return Err(format_err(p, format!("data is {} bytes, shape {:?} needs {}", raw.len() - header_end, shape, nbytes)));
    }
    Ok(Npy { dtype, shape, data: raw[header_end..].to_vec(), path: p.to_string() })
}

/// The text after `'key':` up to the next top-level comma (shape tuples are kept whole).
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let k = header.find(&format!("'{key}'"))?;
    let rest = header[k + key.len() + 2..].trim_start().strip_prefix(':')?.trim_start();
    if rest.starts_with('(') {
        return Some(&rest[..=rest.find(')')?]);
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

/// Writes a float32 array (C order) as `.npy` v1.0, atomically (temp file + rename).
pub fn write_f32(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> std::io::Result<()> {
    let expected: usize = shape.iter().product();
    if expected != data.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("shape {shape:?} needs {expected} values, got {}", data.len()),
        ));
    }
    let shape_txt = match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // Pad so that the data starts on a 64-byte boundary, header ending in '\n' (format.py's rule).
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut buf = Vec::with_capacity(10 + header.len() + data.len() * 4);
    buf.extend_from_slice(b"\x93NUMPY\x01\x00");
    buf.extend_from_slice(&(header.len() as u16).to_le_bytes());
    buf.extend_from_slice(header.as_bytes());
    for v in data {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    let path = path.as_ref();
    let tmp = path.with_extension("npy.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&buf)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        write_f32(&p, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, -6.5]).unwrap();
        let a = read(&p).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.to_f32().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.5]);
        write_f32(&p, &[1], &[7.0]).unwrap();
        assert_eq!(read(&p).unwrap().shape, vec![1]);
    }

    #[test]
    fn truncated_and_foreign_files_are_errors() {
        assert!(parse(b"hello", "x").is_err());
        let mut ok = b"\x93NUMPY\x01\x00".to_vec();
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }\n";
        ok.extend_from_slice(&(h.len() as u16).to_le_bytes());
        ok.extend_from_slice(h.as_bytes());
        ok.extend_from_slice(&[0u8; 12]);
        assert!(parse(&ok, "x").unwrap_err().to_string().contains("needs 16"));
    }
}
