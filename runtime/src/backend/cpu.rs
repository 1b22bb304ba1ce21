//! The CPU backend: activations are host `Vec<f32>`; matmuls run ggml's kernels on the weights in
//! their own types: on the repacked copy where the weight has one ([`Weight::packed`]: AMX tiles or an
//! interleaved layout, what llama.cpp uses), else on the mapped bytes (`vec_dot` for one token,
//! `mul_mat` for several), threaded with rayon or ggml's pool (`--threads`).

use half::f16;
use half::slice::HalfFloatSliceExt;
use moellava_kernels::cpu::packed::PackedMat;
use moellava_kernels::cpu::{self, gemm, ops, Activation};

use super::{AttnShape, Backend, KvType, RowMode};
use crate::error::Result;
use crate::model::weights::{StackedPair, Weight};

/// Row-major `[rows, cols]` f32 on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostMat {
    pub data: Vec<f32>,
    pub cols: usize,
}

impl HostMat {
    pub fn rows(&self) -> usize {
        self.data.len() / self.cols.max(1)
    }
}

/// Cached keys or values `[P, cols]` on the host, in the cache's element type.
#[derive(Clone, Debug, PartialEq)]
pub enum KvRows {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    type Act = HostMat;
    type Kv = KvRows;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn from_host(&self, data: Vec<f32>, cols: usize) -> HostMat {
        HostMat { data, cols }
    }

    fn to_host(&self, x: &HostMat) -> Vec<f32> {
        x.data.clone()
    }

    fn shape(&self, x: &HostMat) -> (usize, usize) {
        (x.rows(), x.cols)
    }

    fn matmul(&self, x: &HostMat, w: &Weight) -> Result<HostMat> {
        let out = match w.packed() {
            Some(p) => packed_matmul(p, x, RowMode::Sequence)?,
            None => {
                let mut out = vec![0f32; x.rows() * w.rows];
                cpu::matmul(w.mat(), &x.data, &mut out)?;
                out
            }
        };
        Ok(HostMat { data: out, cols: w.rows })
    }

    fn matmul_per_row(&self, x: &HostMat, w: &Weight) -> Result<HostMat> {
        // Exactly what a single token gets from `matmul`: the packed kernel one row at a time, or the
        // plain rows' one-token kernel per token (`cpu::matmul_per_token`).
        let out = match w.packed() {
            Some(p) => packed_matmul(p, x, RowMode::Independent)?,
            None => {
                let mut out = vec![0f32; x.rows() * w.rows];
                cpu::matmul_per_token(w.mat(), &x.data, &mut out)?;
                out
            }
        };
        Ok(HostMat { data: out, cols: w.rows })
    }

    fn embed(&self, table: &Weight, ids: &[u32]) -> Result<HostMat> {
        let mut out = vec![0f32; ids.len() * table.cols];
        cpu::get_rows(table.mat(), ids, &mut out)?;
        Ok(HostMat { data: out, cols: table.cols })
    }

    fn add_bias(&self, x: &mut HostMat, bias: &[f32]) {
        ops::add_bias(&mut x.data, bias);
    }

    fn layer_norm(&self, x: &mut HostMat, w: &[f32], b: Option<&[f32]>, eps: f32) {
        ops::layer_norm(&mut x.data, x.cols, w, b, eps);
    }

    fn rms_norm(&self, x: &mut HostMat, w: &[f32], eps: f32) {
        ops::rms_norm(&mut x.data, x.cols, w, eps);
    }

    fn gate_up(&self, x: &HostMat, gate: &Weight, up: &Weight, stacked: Option<&StackedPair>, mode: RowMode) -> Result<HostMat> {
        let Some((p, f)) = stacked.and_then(|s| Some((s.packed()?, s.rows()))) else {
            return super::gate_up_apart(self, x, gate, up, mode);
        };
        let h = packed_matmul(p, x, mode)?; // [T, 2F]
        Ok(HostMat { data: ops::silu_mul_halves(&h, f), cols: f })
    }

    fn activate(&self, x: &mut HostMat, a: Activation) {
        ops::activate(&mut x.data, a);
    }

    fn mul(&self, x: &mut HostMat, y: &HostMat) {
        ops::mul(&mut x.data, &y.data);
    }

    fn add(&self, x: &mut HostMat, y: &HostMat) {
        ops::add(&mut x.data, &y.data);
    }

    fn rope(&self, x: &mut HostMat, n_head: usize, head_dim: usize, rot_dims: usize, positions: &[usize], base: f32) {
        ops::rope_neox(&mut x.data, n_head, head_dim, rot_dims, positions, base);
    }

    fn attention(&self, q: &HostMat, k: &HostMat, v: &HostMat, shape: AttnShape) -> HostMat {
        HostMat { data: cpu::attention::attention(&q.data, &k.data, &v.data, shape), cols: shape.n_head * shape.head_dim }
    }

    fn attention_cached(&self, q: &HostMat, k: &KvRows, v: &KvRows, shape: AttnShape) -> HostMat {
        let data = match (k, v) {
            (KvRows::F32(k), KvRows::F32(v)) => cpu::attention::attention(&q.data, k, v, shape),
            (KvRows::F16(k), KvRows::F16(v)) => cpu::attention::attention(&q.data, k, v, shape),
            _ => unreachable!("a layer's K and V are created together, in one type"),
        };
        HostMat { data, cols: shape.n_head * shape.head_dim }
    }

    fn split_cols(&self, x: &HostMat, widths: &[usize]) -> Vec<HostMat> {
        let mut parts: Vec<HostMat> =
            widths.iter().map(|w| HostMat { data: Vec::with_capacity(x.rows() * w), cols: *w }).collect();
        for row in x.data.chunks(x.cols) {
            let mut at = 0;
            for p in parts.iter_mut() {
                p.data.extend_from_slice(&row[at..at + p.cols]);
                at += p.cols;
            }
        }
        parts
    }

    fn gather_rows(&self, x: &HostMat, rows: &[usize]) -> HostMat {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for r in rows {
            data.extend_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        HostMat { data, cols: x.cols }
    }

    fn scatter_add_rows(&self, dst: &mut HostMat, src: &HostMat, rows: &[usize], weights: &[f32]) {
        let c = dst.cols;
        for (i, (r, w)) in rows.iter().zip(weights).enumerate() {
            let s = &src.data[i * c..(i + 1) * c];
            dst.data[r * c..(r + 1) * c].iter_mut().zip(s).for_each(|(d, v)| *d += w * v);
        }
    }

    fn concat_rows(&self, parts: &[&HostMat]) -> HostMat {
        let cols = parts.first().map_or(0, |p| p.cols);
        HostMat { data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(), cols }
    }

    fn kv_with_capacity(&self, cols: usize, ty: KvType, rows: usize) -> KvRows {
        match ty {
            KvType::F32 => KvRows::F32(Vec::with_capacity(rows * cols)),
            KvType::F16 => KvRows::F16(Vec::with_capacity(rows * cols)),
        }
    }

    fn kv_append(&self, dst: &mut KvRows, src: &HostMat) {
        match dst {
            KvRows::F32(d) => d.extend_from_slice(&src.data),
            KvRows::F16(d) => {
                let at = d.len();
                d.resize(at + src.data.len(), f16::ZERO);
                d[at..].convert_from_f32_slice(&src.data);
            }
        }
    }

    fn zeros(&self, rows: usize, cols: usize) -> HostMat {
        HostMat { data: vec![0.0; rows * cols], cols }
    }
}

/// `x · Wᵀ` `[T, N]` on a repacked weight: all rows in one call (the output not zeroed first: the
/// kernels write all of it), or ([`RowMode::Independent`]) one row at a time, exactly what a single
/// token gets.
fn packed_matmul(p: &PackedMat, x: &HostMat, mode: RowMode) -> Result<Vec<f32>> {
    Ok(match mode {
        RowMode::Sequence => gemm::gemm_packed_new(p, &x.data)?,
        RowMode::Independent => {
            let mut out = vec![0f32; x.rows() * p.n_rows];
            for (xr, o) in x.data.chunks(x.cols.max(1)).zip(out.chunks_mut(p.n_rows.max(1))) {
                gemm::gemm_packed(p, xr, o)?;
            }
            out
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use moellava_kernels::quant::{self, GgmlType};
    use moellava_kernels::QuantType;

    use super::*;
    use crate::gguf::{GgufFile, GgufWriter, TensorSpec};
    use crate::model::weights::WeightStore;

    #[test]
    fn stacked_gate_and_up_give_the_same_bits_as_two_matmuls() {
        let (f, d) = (96, 512);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ffn.gguf");
        let names = ["gate", "up"];
        let specs = names.iter().map(|n| TensorSpec::from_shape(*n, GgmlType::Q4_K, &[f, d])).collect();
        let mut w = GgufWriter::create(&path, &[], specs).unwrap();
        for (i, n) in names.iter().enumerate() {
            let vals: Vec<f32> = (0..f * d).map(|j| ((j * 7 + i * 13) % 101) as f32 / 50.0 - 1.0).collect();
            w.write_tensor(n, &quant::quantize_rows_vec(QuantType::Q4_K, &vals, d).unwrap()).unwrap();
        }
        w.finish().unwrap();
        let ws = WeightStore::new(Arc::new(GgufFile::open(&path).unwrap()));
        let (gate, up) = (ws.matrix("gate", f, d).unwrap(), ws.matrix("up", f, d).unwrap());
        let pair = StackedPair::new(&gate, &up).expect("mapped, one type and shape");
        if pair.packed().is_none() {
            eprintln!("no repacked layout for q4_K on this CPU: both sides take the same two matmuls");
        }
        // 1 and 2 tokens: our one-token q4_K kernel where it runs; 5: ggml's; 40: our AMX-BF16 one
        for t in [1usize, 2, 5, 40] {
            let x = HostMat { data: (0..t * d).map(|i| (i * 31 % 97) as f32 / 48.0 - 1.0).collect(), cols: d };
            for mode in [RowMode::Sequence, RowMode::Independent] {
                let apart = super::super::gate_up_apart(&CpuBackend, &x, &gate, &up, mode).unwrap();
                let stacked = CpuBackend.gate_up(&x, &gate, &up, Some(&pair), mode).unwrap();
                assert_eq!((stacked.data.len(), stacked.cols), (t * f, f));
                assert!(stacked.data == apart.data, "t={t}, {mode:?}: stacked and apart differ");
            }
        }
    }
}
