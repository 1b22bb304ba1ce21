//! ggml's tensor type ids and block geometry, and the subset moellava computes with.
//!
//! Ids and sizes mirror `ggml/include/ggml.h` (`enum ggml_type`) and `ggml.c` (`type_traits`) of the
//! ggml pinned through `llama-cpp-sys-2`; the test `types_match_ggml_traits` checks every row against the
//! linked library, so a version bump that moves a size fails CI instead of corrupting files.

use std::fmt;

/// Every tensor type ggml defines (as of the pinned version). A GGUF file may hold any of them;
/// `moellava inspect` can describe all of them, the runtime computes with [`QuantType`] only.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
    Q2_0,
}

/// (type, ggml id, lowercase ggml name, elements per block, bytes per block).
const TABLE: [(GgmlType, u32, &str, usize, usize); 35] = [
    (GgmlType::F32, 0, "f32", 1, 4),
    (GgmlType::F16, 1, "f16", 1, 2),
    (GgmlType::Q4_0, 2, "q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "q8_0", 32, 34),
    (GgmlType::Q8_1, 9, "q8_1", 32, 36),
    (GgmlType::Q2_K, 10, "q2_k", 256, 84),
    (GgmlType::Q3_K, 11, "q3_k", 256, 110),
    (GgmlType::Q4_K, 12, "q4_k", 256, 144),
    (GgmlType::Q5_K, 13, "q5_k", 256, 176),
    (GgmlType::Q6_K, 14, "q6_k", 256, 210),
    (GgmlType::Q8_K, 15, "q8_k", 256, 292),
    (GgmlType::IQ2_XXS, 16, "iq2_xxs", 256, 66),
    (GgmlType::IQ2_XS, 17, "iq2_xs", 256, 74),
    (GgmlType::IQ3_XXS, 18, "iq3_xxs", 256, 98),
    (GgmlType::IQ1_S, 19, "iq1_s", 256, 50),
    (GgmlType::IQ4_NL, 20, "iq4_nl", 32, 18),
    (GgmlType::IQ3_S, 21, "iq3_s", 256, 110),
    (GgmlType::IQ2_S, 22, "iq2_s", 256, 82),
    (GgmlType::IQ4_XS, 23, "iq4_xs", 256, 136),
    (GgmlType::I8, 24, "i8", 1, 1),
    (GgmlType::I16, 25, "i16", 1, 2),
    (GgmlType::I32, 26, "i32", 1, 4),
    (GgmlType::I64, 27, "i64", 1, 8),
    (GgmlType::F64, 28, "f64", 1, 8),
    (GgmlType::IQ1_M, 29, "iq1_m", 256, 56),
    (GgmlType::BF16, 30, "bf16", 1, 2),
    (GgmlType::TQ1_0, 34, "tq1_0", 256, 54),
    (GgmlType::TQ2_0, 35, "tq2_0", 256, 66),
    (GgmlType::MXFP4, 39, "mxfp4", 32, 17),
    (GgmlType::NVFP4, 40, "nvfp4", 64, 36),
    (GgmlType::Q1_0, 41, "q1_0", 128, 18),
    (GgmlType::Q2_0, 42, "q2_0", 64, 18),
];

impl GgmlType {
    /// All types, in id order.
    pub fn all() -> impl Iterator<Item = GgmlType> {
        TABLE.iter().map(|row| row.0)
    }

    fn row(self) -> &'static (GgmlType, u32, &'static str, usize, usize) {
        // The table lists every variant exactly once (test `table_is_total`).
        TABLE.iter().find(|row| row.0 == self).expect("GgmlType missing from TABLE")
    }

    /// The type for a ggml id, or `None` for an id this ggml does not define.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TABLE.iter().find(|row| row.1 == id).map(|row| row.0)
    }

    /// The type for a lowercase ggml name (`q4_k`, `f16`, …).
    pub fn from_name(name: &str) -> Option<GgmlType> {
        TABLE.iter().find(|row| row.2 == name).map(|row| row.0)
    }

    pub fn id(self) -> u32 {
        self.row().1
    }

    /// ggml's lowercase name (`q4_k`), as used on the command line.
    pub fn name(self) -> &'static str {
        self.row().2
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        self.row().3
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.row().4
    }

    /// Bytes of a row of `n` elements, or `None` when `n` is not a multiple of the block size
    /// or the size overflows.
    pub fn row_bytes(self, n: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n.is_multiple_of(bs) {
            return None;
        }
        (n / bs).checked_mul(self.type_size() as u64)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The tensor types moellava quantizes to and computes with (the `--type` values of `convert`).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuantType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl QuantType {
    pub const ALL: [QuantType; 11] = [
        QuantType::F32,
        QuantType::F16,
        QuantType::BF16,
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q4_K,
        QuantType::Q5_K,
        QuantType::Q6_K,
    ];

    pub fn ggml(self) -> GgmlType {
        match self {
            QuantType::F32 => GgmlType::F32,
            QuantType::F16 => GgmlType::F16,
            QuantType::BF16 => GgmlType::BF16,
            QuantType::Q8_0 => GgmlType::Q8_0,
            QuantType::Q4_0 => GgmlType::Q4_0,
            QuantType::Q4_1 => GgmlType::Q4_1,
            QuantType::Q5_0 => GgmlType::Q5_0,
            QuantType::Q5_1 => GgmlType::Q5_1,
            QuantType::Q4_K => GgmlType::Q4_K,
            QuantType::Q5_K => GgmlType::Q5_K,
            QuantType::Q6_K => GgmlType::Q6_K,
        }
    }

    /// The computable type for a ggml type, if moellava computes with it.
    pub fn from_ggml(t: GgmlType) -> Option<QuantType> {
        QuantType::ALL.into_iter().find(|q| q.ggml() == t)
    }

    /// Parses a lowercase ggml name; the error lists the valid names.
    pub fn parse(name: &str) -> Result<QuantType, String> {
        let lower = name.to_ascii_lowercase();
        GgmlType::from_name(&lower)
            .and_then(QuantType::from_ggml)
            .ok_or_else(|| format!("unknown tensor type '{name}'; expected one of: {}", Self::names().join(" ")))
    }

    pub fn names() -> Vec<&'static str> {
        QuantType::ALL.iter().map(|q| q.name()).collect()
    }

    pub fn name(self) -> &'static str {
        self.ggml().name()
    }

    pub fn id(self) -> u32 {
        self.ggml().id()
    }

    pub fn block_size(self) -> usize {
        self.ggml().block_size()
    }

    pub fn type_size(self) -> usize {
        self.ggml().type_size()
    }

    /// Bytes of `n_rows` rows of `n_per_row` elements. Panics-free: `None` on a row length that is
    /// not a multiple of the block size, or on overflow.
    pub fn bytes_for(self, n_rows: usize, n_per_row: usize) -> Option<usize> {
        let row = self.ggml().row_bytes(n_per_row as u64)?;
        usize::try_from(row).ok()?.checked_mul(n_rows)
    }

    /// True for the block-quantized types (not F32/F16/BF16).
    pub fn is_quantized(self) -> bool {
        !matches!(self, QuantType::F32 | QuantType::F16 | QuantType::BF16)
    }

    /// The activation format ggml's CPU `vec_dot` pairs with this weight type
    /// (`type_traits_cpu[t].vec_dot_type`; checked against the library in tests).
    pub fn dot_type(self) -> GgmlType {
        match self {
            QuantType::F32 => GgmlType::F32,
            QuantType::F16 => GgmlType::F16,
            QuantType::BF16 => GgmlType::BF16,
            QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q5_0 => GgmlType::Q8_0,
            QuantType::Q4_1 | QuantType::Q5_1 => GgmlType::Q8_1,
            QuantType::Q4_K | QuantType::Q5_K | QuantType::Q6_K => GgmlType::Q8_K,
        }
    }

    /// Nominal bits per weight (bytes per block × 8 / elements per block).
    pub fn bits_per_weight(self) -> f64 {
        self.type_size() as f64 * 8.0 / self.block_size() as f64
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for QuantType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        QuantType::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_total_and_ids_unique() {
        let mut ids: Vec<u32> = TABLE.iter().map(|r| r.1).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), TABLE.len());
        for t in GgmlType::all() {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(GgmlType::from_name(t.name()), Some(t));
        }
    }

    #[test]
    fn quant_type_parse_round_trips_and_rejects_unknown() {
        for q in QuantType::ALL {
            assert_eq!(QuantType::parse(q.name()), Ok(q));
            assert_eq!(QuantType::parse(&q.name().to_uppercase()), Ok(q));
        }
        let err = QuantType::parse("q3_k").unwrap_err();
        assert!(err.contains("q4_k") && err.contains("'q3_k'"), "{err}");
    }

    #[test]
    fn row_bytes_rejects_partial_blocks() {
        assert_eq!(GgmlType::Q4_K.row_bytes(512), Some(288));
        assert_eq!(GgmlType::Q4_K.row_bytes(500), None);
        assert_eq!(GgmlType::F32.row_bytes(u64::MAX), None);
        assert_eq!(QuantType::Q8_0.bytes_for(3, 64), Some(3 * 68));
    }
}
