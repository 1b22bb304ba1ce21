//! Quantized matrix multiplication on the CPU: `y[t, r] = Σ_k x[t, k] · W[r, k]` with W in any
//! [`QuantType`], through ggml's `vec_dot` (activations converted once per row to the type ggml pairs
//! with the weights), threaded over weight rows with rayon.
//!
//! Dims: T = n_tokens (activation rows), K = n_cols (shared), N = n_rows (weight rows / outputs).

use rayon::prelude::*;

use crate::quant::{self, QuantError, QuantType};

/// A weight matrix in ggml block format: `n_rows` rows of `n_cols` values.
#[derive(Clone, Copy, Debug)]
pub struct QMatRef<'a> {
    pub data: &'a [u8],
    pub qtype: QuantType,
    pub n_rows: usize,
    pub n_cols: usize,
}

impl<'a> QMatRef<'a> {
    pub fn new(data: &'a [u8], qtype: QuantType, n_rows: usize, n_cols: usize) -> Result<Self, QuantError> {
        let want = qtype.bytes_for(n_rows, n_cols).ok_or(QuantError::RowLength {
            qtype: qtype.ggml(),
            n_per_row: n_cols,
            block_size: qtype.block_size(),
        })?;
        if data.len() != want {
            return Err(QuantError::Length { what: "weight bytes", expected: want, got: data.len() });
        }
        Ok(QMatRef { data, qtype, n_rows, n_cols })
    }

    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.n_rows.max(1)
    }

    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Rows `[first, first + n)` as a matrix of their own (an expert of a stacked tensor).
    pub fn rows(&self, first: usize, n: usize) -> QMatRef<'a> {
        let rb = self.row_bytes();
        QMatRef { data: &self.data[first * rb..(first + n) * rb], qtype: self.qtype, n_rows: n, n_cols: self.n_cols }
    }

    /// Row `r` as f32.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<(), QuantError> {
        quant::dequantize_rows(self.qtype, self.row(r), out)
    }
}

/// Activation rows converted to the weight type's `vec_dot` partner.
pub struct QuantizedActivations {
    pub bytes: Vec<u8>,
    pub row_bytes: usize,
}

pub fn quantize_activations(qtype: QuantType, x: &[f32], n_cols: usize) -> Result<QuantizedActivations, QuantError> {
    let dot = qtype.dot_type();
    let row_bytes = quant::activation_bytes(dot, n_cols).ok_or(QuantError::Overflow)?;
    let n_tok = x.len() / n_cols;
    let mut bytes = vec![0u8; n_tok * row_bytes];
    bytes
        .par_chunks_mut(row_bytes)
        .zip(x.par_chunks(n_cols))
        .try_for_each(|(dst, src)| quant::quantize_activation(dot, src, dst))?;
    Ok(QuantizedActivations { bytes, row_bytes })
}

/// The tokens in `x` (`x_len` values: whole rows of `k`) for a product with `n_out` outputs per
/// token, with `out_len` checked against them: every matmul entry point's shape check (ggml's, ours,
/// one token or many).
pub(crate) fn token_count(k: usize, n_out: usize, x_len: usize, out_len: usize) -> Result<usize, QuantError> {
    if k == 0 || !x_len.is_multiple_of(k) {
        return Err(QuantError::Length {
            what: "activation values (whole rows of K)",
            expected: x_len / k.max(1) * k,
            got: x_len,
        });
    }
    let t = x_len / k;
    let want = t.checked_mul(n_out).ok_or(QuantError::Overflow)?;
    if out_len != want {
        return Err(QuantError::Length { what: "output values (T × outputs per token)", expected: want, got: out_len });
    }
    Ok(t)
}

/// Tokens from which a matmul goes through ggml's batched `mul_mat` ([`super::gemm`]) rather than
/// one `vec_dot` per (row, token). One token (decode) stays here: no thread hand-off to ggml's pool.
pub const GEMM_MIN_TOKENS: usize = 2;

/// `out[T, N] = x[T, K] · W[N, K]ᵀ`.
pub fn matmul(w: QMatRef, x: &[f32], out: &mut [f32]) -> Result<(), QuantError> {
    if w.n_cols > 0 && x.len() / w.n_cols >= GEMM_MIN_TOKENS {
        return super::gemm::gemm(w, x, out);
    }
    matmul_per_token(w, x, out)
}

/// `out[T, N] = x[T, K] · W[N, K]ᵀ`, each token's outputs exactly what [`matmul`] gives that token
/// alone (a batch of independent rows): our AVX2 kernel for q8_0 ([`super::q8_0_rows_matvec`]),
/// else one ggml `vec_dot` per (weight row, token).
pub fn matmul_per_token(w: QMatRef, x: &[f32], out: &mut [f32]) -> Result<(), QuantError> {
    if w.qtype == QuantType::Q8_0 && super::q8_0_rows_matvec::available() {
        return super::q8_0_rows_matvec::matmul(w, x, out);
    }
    matmul_vec_dot(w, x, out)
}

/// `out[T, N] = x[T, K] · W[N, K]ᵀ` with one ggml `vec_dot` per (weight row, token), threaded over
/// weight rows with rayon (each row is read once and used for every token).
pub fn matmul_vec_dot(w: QMatRef, x: &[f32], out: &mut [f32]) -> Result<(), QuantError> {
    let (n, k) = (w.n_rows, w.n_cols);
    let t = token_count(k, n, x.len(), out.len())?;
    let act = quantize_activations(w.qtype, x, k)?;
    let rows_per_task = (n / (rayon::current_num_threads() * 8)).clamp(1, 256);
    if t == 1 {
        return out.par_chunks_mut(rows_per_task).enumerate().try_for_each(|(c, chunk)| {
            for (i, o) in chunk.iter_mut().enumerate() {
                *o = quant::vec_dot(w.qtype, k, w.row(c * rows_per_task + i), &act.bytes)?;
            }
            Ok(())
        });
    }
    // Several tokens: each task owns a block of weight rows and produces their T outputs (W read once),
    // written transposed [N, T] and transposed back.
    let mut out_t = vec![0f32; n * t];
    out_t.par_chunks_mut(rows_per_task * t).enumerate().try_for_each(|(c, chunk)| {
        for (i, row_out) in chunk.chunks_mut(t).enumerate() {
            let wr = w.row(c * rows_per_task + i);
            for (tok, o) in row_out.iter_mut().enumerate() {
                *o = quant::vec_dot(w.qtype, k, wr, &act.bytes[tok * act.row_bytes..(tok + 1) * act.row_bytes])?;
            }
        }
        Ok::<(), QuantError>(())
    })?;
    out.par_chunks_mut(n).enumerate().for_each(|(tok, row)| {
        for (r, o) in row.iter_mut().enumerate() {
            *o = out_t[r * t + tok];
        }
    });
    Ok(())
}

/// Rows `ids` of a (possibly quantized) table as f32 `[ids.len(), n_cols]`: an embedding lookup.
pub fn get_rows(w: QMatRef, ids: &[u32], out: &mut [f32]) -> Result<(), QuantError> {
    if out.len() != ids.len() * w.n_cols {
        return Err(QuantError::Length { what: "output values", expected: ids.len() * w.n_cols, got: out.len() });
    }
    for (id, dst) in ids.iter().zip(out.chunks_mut(w.n_cols)) {
        let r = *id as usize;
        if r >= w.n_rows {
            return Err(QuantError::Length { what: "row index (< rows)", expected: w.n_rows, got: r });
        }
        w.dequantize_row(r, dst)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_signal as signal;

    #[test]
    fn matmul_matches_f64_reference_on_dequantized_weights() {
        let (n, k) = (37, 512);
        for q in [QuantType::F32, QuantType::F16, QuantType::Q8_0, QuantType::Q4_K] {
            let wf = signal(n * k, 0.37);
            let wq = quant::quantize_rows_vec(q, &wf, k).unwrap();
            let w = QMatRef::new(&wq, q, n, k).unwrap();
            let mut wd = vec![0f32; n * k];
            quant::dequantize_rows(q, &wq, &mut wd).unwrap();
            for t in [1usize, 3] {
                let x = signal(t * k, 0.11);
                let mut y = vec![0f32; t * n];
                matmul(w, &x, &mut y).unwrap();
                for tok in 0..t {
                    for r in 0..n {
                        let exact: f64 = (0..k).map(|j| wd[r * k + j] as f64 * x[tok * k + j] as f64).sum();
                        let scale: f64 = (0..k).map(|j| (wd[r * k + j] as f64 * x[tok * k + j] as f64).abs()).sum();
                        let tol = if q == QuantType::F32 { 1e-5 } else { 2e-2 };
                        assert!((y[tok * n + r] as f64 - exact).abs() <= tol * scale, "{q} t={t} [{tok},{r}]");
                    }
                }
            }
        }
    }
}
