//! Dot product and axpy over f16 values in SIMD registers (see [`super::Widen`]'s f16 impl): 16
//! values per conversion with AVX-512, 8 with AVX2 + F16C (CPUs without AVX-512, e.g. AMD Zen 3).

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Avx512,
    Avx2,
}

/// A SIMD width this CPU has: only [`best`] and [`supported`] make one, after checking the CPU, so
/// holding one is what makes [`dot`] and [`axpy`] sound (no check per call: they run once per key
/// position in the one-token attention).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Width(Kind);

/// Widest first.
const KINDS: [Kind; 2] = [Kind::Avx512, Kind::Avx2];

/// Whether the CPU has `kind`'s features (a compile-time answer under `-C target-cpu=native`, else
/// a cached feature check).
#[inline]
fn has(kind: Kind) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match kind {
            Kind::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            Kind::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = kind;
        false
    }
}

/// The widest width this CPU has, if any.
#[inline]
pub fn best() -> Option<Width> {
    KINDS.into_iter().find(|&k| has(k)).map(Width)
}

/// Every width this CPU has, widest first (the tests check each).
#[cfg(test)]
pub fn supported() -> Vec<Width> {
    KINDS.into_iter().filter(|&k| has(k)).map(Width).collect()
}

/// `Σ a[i]·b[i]` over the shorter length.
#[inline]
pub fn dot(width: Width, a: &[f32], b: &[half::f16]) -> f32 {
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a `Width` exists only for features the CPU has (see its doc); both slices hold at
    // least `n` values.
    unsafe {
        match width.0 {
            Kind::Avx512 => x86::dot512(a.as_ptr(), b.as_ptr().cast(), n),
            Kind::Avx2 => x86::dot256(a.as_ptr(), b.as_ptr().cast(), n),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = width;
        super::dot_lanes(&a[..n], &b[..n])
    }
}

/// `o[i] += w·b[i]` over the shorter length.
#[inline]
pub fn axpy(width: Width, o: &mut [f32], w: f32, b: &[half::f16]) {
    let n = o.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a `Width` exists only for features the CPU has (see its doc); both slices hold at
    // least `n` values and `o` is borrowed mutably, so nothing else reads or writes it meanwhile.
    unsafe {
        match width.0 {
            Kind::Avx512 => x86::axpy512(o.as_mut_ptr(), w, b.as_ptr().cast(), n),
            Kind::Avx2 => x86::axpy256(o.as_mut_ptr(), w, b.as_ptr().cast(), n),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = width;
        o[..n].iter_mut().zip(&b[..n]).for_each(|(a, v)| *a += w * v.to_f32());
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX512F is available; `a` and `b` (f16 bits) point at `n` values each.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot512(a: *const f32, b: *const u16, n: usize) -> f32 {
        // SAFETY: (whole body) every read is below index `n` of its operand.
        unsafe {
            let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut i = 0;
            while i + 32 <= n {
                let b0 = _mm512_cvtph_ps(_mm256_loadu_si256(b.add(i) as *const _));
                let b1 = _mm512_cvtph_ps(_mm256_loadu_si256(b.add(i + 16) as *const _));
                acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(i)), b0, acc0);
                acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(i + 16)), b1, acc1);
                i += 32;
            }
            if i + 16 <= n {
                let b0 = _mm512_cvtph_ps(_mm256_loadu_si256(b.add(i) as *const _));
                acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(i)), b0, acc0);
                i += 16;
            }
            let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
            while i < n {
                sum += a.add(i).read() * half::f16::from_bits(b.add(i).read()).to_f32();
                i += 1;
            }
            sum
        }
    }

    /// # Safety
    /// AVX512F is available; `o` and `b` (f16 bits) point at `n` values each, `o` writable.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn axpy512(o: *mut f32, w: f32, b: *const u16, n: usize) {
        // SAFETY: (whole body) every access is below index `n` of its operand.
        unsafe {
            let vw = _mm512_set1_ps(w);
            let mut i = 0;
            while i + 16 <= n {
                let bv = _mm512_cvtph_ps(_mm256_loadu_si256(b.add(i) as *const _));
                _mm512_storeu_ps(o.add(i), _mm512_fmadd_ps(vw, bv, _mm512_loadu_ps(o.add(i))));
                i += 16;
            }
            while i < n {
                *o.add(i) += w * half::f16::from_bits(b.add(i).read()).to_f32();
                i += 1;
            }
        }
    }

    /// # Safety
    /// AVX2, FMA and F16C are available; `a` and `b` (f16 bits) point at `n` values each.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot256(a: *const f32, b: *const u16, n: usize) -> f32 {
        // SAFETY: (whole body) every read is below index `n` of its operand.
        unsafe {
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i + 16 <= n {
                let b0 = _mm256_cvtph_ps(_mm_loadu_si128(b.add(i) as *const _));
                let b1 = _mm256_cvtph_ps(_mm_loadu_si128(b.add(i + 8) as *const _));
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), b0, acc0);
                acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i + 8)), b1, acc1);
                i += 16;
            }
            if i + 8 <= n {
                let b0 = _mm256_cvtph_ps(_mm_loadu_si128(b.add(i) as *const _));
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), b0, acc0);
                i += 8;
            }
            let v = _mm256_add_ps(acc0, acc1);
            let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
            let mut sum = _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
            while i < n {
                sum += a.add(i).read() * half::f16::from_bits(b.add(i).read()).to_f32();
                i += 1;
            }
            sum
        }
    }

    /// # Safety
    /// AVX2, FMA and F16C are available; `o` and `b` (f16 bits) point at `n` values each, `o`
    /// writable.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy256(o: *mut f32, w: f32, b: *const u16, n: usize) {
        // SAFETY: (whole body) every access is below index `n` of its operand.
        unsafe {
            let vw = _mm256_set1_ps(w);
            let mut i = 0;
            while i + 8 <= n {
                let bv = _mm256_cvtph_ps(_mm_loadu_si128(b.add(i) as *const _));
                _mm256_storeu_ps(o.add(i), _mm256_fmadd_ps(vw, bv, _mm256_loadu_ps(o.add(i))));
                i += 8;
            }
            while i < n {
                *o.add(i) += w * half::f16::from_bits(b.add(i).read()).to_f32();
                i += 1;
            }
        }
    }
}
