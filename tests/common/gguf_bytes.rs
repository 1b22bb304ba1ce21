//! A raw GGUF byte builder that can write anything — valid files and every kind of broken one —
//! for the reader's malformed-input corpus. (The real writer refuses to write invalid files.)

pub fn str_bytes(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

/// A key/value entry with a raw type id and payload.
pub fn kv_raw(key: &[u8], type_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = str_bytes(key);
    v.extend_from_slice(&type_id.to_le_bytes());
    v.extend_from_slice(payload);
    v
}

pub fn kv_u32(key: &str, x: u32) -> Vec<u8> {
    kv_raw(key.as_bytes(), 4, &x.to_le_bytes())
}

pub fn kv_str(key: &str, s: &str) -> Vec<u8> {
    kv_raw(key.as_bytes(), 8, &str_bytes(s.as_bytes()))
}

/// An array payload: element type, count, then the raw element bytes.
pub fn array_payload(elem_type: u32, count: u64, elems: &[u8]) -> Vec<u8> {
    let mut v = elem_type.to_le_bytes().to_vec();
    v.extend_from_slice(&count.to_le_bytes());
    v.extend_from_slice(elems);
    v
}

/// A tensor-table entry.
pub fn tensor_info(name: &[u8], dims: &[u64], ggml_type: u32, offset: u64) -> Vec<u8> {
    let mut v = str_bytes(name);
    v.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        v.extend_from_slice(&d.to_le_bytes());
    }
    v.extend_from_slice(&ggml_type.to_le_bytes());
    v.extend_from_slice(&offset.to_le_bytes());
    v
}

/// The parts of a GGUF file, each replaceable to inject one defect.
#[derive(Clone)]
pub struct Parts {
    pub magic: Vec<u8>,
    pub version: u32,
    /// Overrides of the counts written in the header (default: the real counts).
    pub n_tensors: Option<u64>,
    pub n_kv: Option<u64>,
    pub kvs: Vec<Vec<u8>>,
    pub infos: Vec<Vec<u8>>,
    pub alignment: usize,
    pub data: Vec<u8>,
}

impl Parts {
    /// A small valid file: three keys, an f32 tensor [2, 4] and a q8_0 tensor [64].
    pub fn valid() -> Parts {
        let f32_data: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let mut q8 = vec![0u8; 68];
        q8[0..2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        q8[34..36].copy_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
        let mut data = f32_data.clone();
        data.extend_from_slice(&q8);
        let tokens: Vec<u8> = [b"a".as_slice(), b"bc"].iter().flat_map(|s| str_bytes(s)).collect();
        Parts {
            magic: b"GGUF".to_vec(),
            version: 3,
            n_tensors: None,
            n_kv: None,
            kvs: vec![
                kv_str("general.architecture", "test"),
                kv_u32("test.block_count", 2),
                kv_raw(b"tokenizer.ggml.tokens", 9, &array_payload(8, 2, &tokens)),
            ],
            infos: vec![tensor_info(b"a", &[4, 2], 0, 0), tensor_info(b"b", &[64], 8, 32)],
            alignment: 32,
            data,
        }
    }

    /// Serialises: header, kvs, tensor infos, padding to the alignment, data (tensor "b" starts at 32).
    pub fn bytes(&self) -> Vec<u8> {
        let mut v = self.magic.clone();
        v.extend_from_slice(&self.version.to_le_bytes());
        v.extend_from_slice(&self.n_tensors.unwrap_or(self.infos.len() as u64).to_le_bytes());
        v.extend_from_slice(&self.n_kv.unwrap_or(self.kvs.len() as u64).to_le_bytes());
        for kv in &self.kvs {
            v.extend_from_slice(kv);
        }
        for t in &self.infos {
            v.extend_from_slice(t);
        }
        while !v.len().is_multiple_of(self.alignment) {
            v.push(0);
        }
        v.extend_from_slice(&self.data);
        v
    }
}
