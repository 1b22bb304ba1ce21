//! The block-format wrappers against the linked ggml and against plain f64 arithmetic.
//! (Bit-exactness against the `gguf` Python package lives in the root `tests/quant_golden.rs`.)

use moellava_kernels::quant::{self, GgmlType, QuantError, QuantType};

/// Round-trip RMSE bound on ggml's test vector (|x| ≤ 2.1): uniform rounding to a step of
/// 4.2 / 2^bits has RMSE step/√12; 20 % headroom for block scales that round up.
fn max_rmse(q: QuantType) -> f64 {
    let bits = match q {
        QuantType::F32 => return 0.0,
        QuantType::F16 => 11,
        QuantType::BF16 | QuantType::Q8_0 => 8,
        QuantType::Q6_K => 6,
        QuantType::Q5_0 | QuantType::Q5_1 | QuantType::Q5_K => 5,
        QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q4_K => 4,
    };
    1.2 * (4.2 / 2f64.powi(bits)) / 12f64.sqrt()
}
/// vec_dot quantizes the activation too (Q8_0/Q8_K), so it differs from the exact f64 dot of the
/// dequantized weight and the original activation by that activation rounding: ggml allows 0.02 (low-bit 0.04).
const MAX_DOT_REL_ERR: f64 = 0.02;

/// ggml's test vector: 0.1 + 2 cos(i + offset).
fn test_vector(n: usize, offset: f32) -> Vec<f32> {
    (0..n).map(|i| 0.1 + 2.0 * (i as f32 + offset).cos()).collect()
}

fn rmse(a: &[f32], b: &[f32]) -> f64 {
    let s: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    (s / a.len() as f64).sqrt()
}

#[test]
fn types_match_ggml_traits() {
    for t in GgmlType::all() {
        let (blck, size, name) = quant::ggml_reported_geometry(t);
        assert_eq!((blck, size), (t.block_size(), t.type_size()), "geometry of {t}");
        assert_eq!(name.to_ascii_lowercase(), t.name(), "name of id {}", t.id());
    }
}

#[test]
fn dot_types_match_ggml_cpu_traits() {
    for q in QuantType::ALL {
        assert_eq!(quant::ggml_reported_dot_type(q), Some(q.dot_type()), "vec_dot_type of {q}");
    }
}

#[test]
fn round_trip_error_is_within_type_bounds() {
    let n = 4096;
    let x = test_vector(n, 0.0);
    for q in QuantType::ALL {
        let bytes = quant::quantize_rows_vec(q, &x, 512).unwrap();
        assert_eq!(bytes.len(), q.bytes_for(n / 512, 512).unwrap());
        let mut y = vec![0f32; n];
        quant::dequantize_rows(q, &bytes, &mut y).unwrap();
        let e = rmse(&x, &y);
        let limit = max_rmse(q);
        assert!(e <= limit, "{q}: rmse {e} > {limit}");
    }
}

#[test]
fn vec_dot_matches_f64_dot_of_dequantized_weights() {
    let n = 1024;
    let w = test_vector(n, 0.0);
    let a = test_vector(n, 1.0);
    for q in QuantType::ALL {
        let wq = quant::quantize_rows_vec(q, &w, n).unwrap();
        let mut wd = vec![0f32; n];
        quant::dequantize_rows(q, &wq, &mut wd).unwrap();
        let exact: f64 = wd.iter().zip(&a).map(|(x, y)| *x as f64 * *y as f64).sum();
        let mut aq = vec![0u8; quant::activation_bytes(q.dot_type(), n).unwrap()];
        quant::quantize_activation(q.dot_type(), &a, &mut aq).unwrap();
        let got = quant::vec_dot(q, n, &wq, &aq).unwrap() as f64;
        let scale: f64 = wd.iter().zip(&a).map(|(x, y)| (*x as f64 * *y as f64).abs()).sum();
        let rel = (got - exact).abs() / scale;
        assert!(rel <= MAX_DOT_REL_ERR, "{q}: vec_dot {got} vs {exact} (rel {rel})");
    }
}

#[test]
fn bad_lengths_are_errors_not_aborts() {
    let x = vec![1f32; 64];
    assert!(matches!(quant::quantize_rows_vec(QuantType::Q4_K, &x, 64), Err(QuantError::RowLength { .. })));
    let mut out = vec![0u8; 10];
    assert!(matches!(quant::quantize_rows(QuantType::Q8_0, &x, 32, &mut out), Err(QuantError::Length { .. })));
    let mut y = vec![0f32; 31];
    assert!(matches!(quant::dequantize_rows(QuantType::Q4_0, &[0u8; 18], &mut y), Err(QuantError::RowLength { .. })));
    let mut y = vec![0f32; 32];
    assert!(matches!(quant::dequantize_rows(QuantType::Q4_0, &[0u8; 17], &mut y), Err(QuantError::Length { .. })));
    assert!(quant::vec_dot(QuantType::Q8_0, 32, &[0u8; 34], &[0u8; 33]).is_err());
    assert!(quant::vec_dot(QuantType::Q4_K, 32, &[0u8; 18], &[0u8; 34]).is_err());
}

#[test]
fn all_zero_rows_quantize_to_zero() {
    let x = vec![0f32; 512];
    for q in QuantType::ALL {
        let bytes = quant::quantize_rows_vec(q, &x, 512).unwrap();
        let mut y = vec![1f32; 512];
        quant::dequantize_rows(q, &bytes, &mut y).unwrap();
        assert!(y.iter().all(|v| *v == 0.0), "{q}");
    }
}
