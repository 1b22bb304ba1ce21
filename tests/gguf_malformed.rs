//! The GGUF reader rejects every malformed file — one variant per defect class — with an error
//! that names a byte offset, never a panic; and `moellava inspect` exits 1 with one line on stderr.
//! The variants are also written to `target/malformed-gguf/` as a seed corpus for `cargo fuzz`.

mod common;

use common::gguf_bytes::*;
use moellava_runtime::gguf::GgufMeta;

type Variant = (&'static str, Vec<u8>);

fn with(f: impl FnOnce(&mut Parts)) -> Vec<u8> {
    let mut p = Parts::valid();
    f(&mut p);
    p.bytes()
}

fn truncated(n: usize) -> Vec<u8> {
    let mut b = Parts::valid().bytes();
    b.truncate(n);
    b
}

/// Offset of the tensor table in the valid file (after header and kvs).
fn table_start() -> usize {
    let p = Parts::valid();
    24 + p.kvs.iter().map(Vec::len).sum::<usize>()
}

/// Offset just after the tensor table (before the padding and the data).
fn table_end() -> usize {
    table_start() + Parts::valid().infos.iter().map(Vec::len).sum::<usize>()
}

fn variants() -> Vec<Variant> {
    let valid_len = Parts::valid().bytes().len();
    vec![
        // header
        ("header_empty_file", vec![]),
        ("header_three_bytes", b"GGU".to_vec()),
        ("header_wrong_magic", with(|p| p.magic = b"GGUX".to_vec())),
        ("header_lowercase_magic", with(|p| p.magic = b"gguf".to_vec())),
        ("header_version_0", with(|p| p.version = 0)),
        ("header_version_1", with(|p| p.version = 1)),
        ("header_version_4", with(|p| p.version = 4)),
        ("header_version_big_endian", with(|p| p.version = 3u32.swap_bytes())),
        ("header_truncated_after_version", truncated(8)),
        // counts
        ("counts_tensors_u64_max", with(|p| p.n_tensors = Some(u64::MAX))),
        ("counts_kv_u64_max", with(|p| p.n_kv = Some(u64::MAX))),
        ("counts_kv_2_pow_62", with(|p| p.n_kv = Some(1 << 62))),
        ("counts_kv_one_too_many", with(|p| p.n_kv = Some(4))),
        ("counts_tensors_one_too_many", with(|p| p.n_tensors = Some(3))),
        // lengths
        ("lengths_key_u64_max", with(|p| p.kvs[0] = u64::MAX.to_le_bytes().to_vec())),
        ("lengths_key_past_eof", with(|p| p.kvs[1] = [(1000u64).to_le_bytes().as_slice(), b"short"].concat())),
        (
            "lengths_string_value_past_eof",
            with(|p| p.kvs[0] = kv_raw(b"general.architecture", 8, &[(5000u64).to_le_bytes().as_slice(), b"x"].concat())),
        ),
        ("lengths_string_value_u64_max", with(|p| p.kvs[0] = kv_raw(b"general.architecture", 8, &u64::MAX.to_le_bytes()))),
        ("lengths_empty_key", with(|p| p.kvs[1] = kv_raw(b"", 4, &2u32.to_le_bytes()))),
        ("lengths_key_not_utf8", with(|p| p.kvs[1] = kv_raw(b"test.\xff\xfe", 4, &2u32.to_le_bytes()))),
        ("lengths_string_value_not_utf8", with(|p| p.kvs[0] = kv_raw(b"general.architecture", 8, &str_bytes(b"te\xc3\x28st")))),
        // types
        ("types_value_type_13", with(|p| p.kvs[1] = kv_raw(b"test.block_count", 13, &2u32.to_le_bytes()))),
        ("types_value_type_u32_max", with(|p| p.kvs[1] = kv_raw(b"test.block_count", u32::MAX, &2u32.to_le_bytes()))),
        ("types_bool_value_2", with(|p| p.kvs[1] = kv_raw(b"test.flag", 7, &[2]))),
        ("types_ggml_type_4_removed", with(|p| p.infos[0] = tensor_info(b"a", &[4, 2], 4, 0))),
        ("types_ggml_type_99", with(|p| p.infos[0] = tensor_info(b"a", &[4, 2], 99, 0))),
        // arrays
        (
            "arrays_nested",
            with(|p| p.kvs[2] = kv_raw(b"tokenizer.ggml.tokens", 9, &array_payload(9, 1, &array_payload(4, 1, &[1, 0, 0, 0])))),
        ),
        ("arrays_count_u64_max", with(|p| p.kvs[2] = kv_raw(b"tokenizer.ggml.tokens", 9, &array_payload(4, u64::MAX, &[])))),
        ("arrays_count_past_eof", with(|p| p.kvs[2] = kv_raw(b"tokenizer.ggml.tokens", 9, &array_payload(4, 100_000, &[0; 8])))),
        ("arrays_unknown_element_type", with(|p| p.kvs[2] = kv_raw(b"tokenizer.ggml.tokens", 9, &array_payload(13, 1, &[0; 4])))),
        ("arrays_bool_element_7", with(|p| p.kvs[2] = kv_raw(b"flags", 9, &array_payload(7, 3, &[1, 7, 0])))),
        (
            "arrays_string_element_past_eof",
            with(|p| {
                p.kvs[2] = kv_raw(
                    b"tokenizer.ggml.tokens",
                    9,
                    &array_payload(8, 2, &[str_bytes(b"a"), (9999u64).to_le_bytes().to_vec()].concat()),
                )
            }),
        ),
        (
            "arrays_string_element_not_utf8",
            with(|p| p.kvs[2] = kv_raw(b"tokenizer.ggml.tokens", 9, &array_payload(8, 1, &str_bytes(b"\x80")))),
        ),
        // names
        ("names_duplicate_key", with(|p| p.kvs[1] = kv_str("general.architecture", "again"))),
        ("names_duplicate_tensor", with(|p| p.infos[1] = tensor_info(b"a", &[64], 8, 32))),
        ("names_empty_tensor_name", with(|p| p.infos[0] = tensor_info(b"", &[4, 2], 0, 0))),
        ("names_tensor_name_64_bytes", with(|p| p.infos[0] = tensor_info(&[b'x'; 64], &[4, 2], 0, 0))),
        ("names_tensor_name_not_utf8", with(|p| p.infos[0] = tensor_info(b"a\xff", &[4, 2], 0, 0))),
        // dims
        ("dims_zero_dims", with(|p| p.infos[0] = tensor_info(b"a", &[], 0, 0))),
        ("dims_five_dims", with(|p| p.infos[0] = tensor_info(b"a", &[1, 1, 1, 1, 8], 0, 0))),
        ("dims_zero_size", with(|p| p.infos[0] = tensor_info(b"a", &[4, 0], 0, 0))),
        ("dims_above_i64_max", with(|p| p.infos[0] = tensor_info(b"a", &[4, 1 << 63], 0, 0))),
        ("dims_product_overflows", with(|p| p.infos[0] = tensor_info(b"a", &[1 << 32, 1 << 32], 0, 0))),
        ("dims_row_not_block_multiple", with(|p| p.infos[1] = tensor_info(b"b", &[33], 8, 32))),
        ("dims_bytes_overflow", with(|p| p.infos[0] = tensor_info(b"a", &[1 << 31, 1 << 31], 28, 0))),
        // offsets
        ("offsets_first_not_zero", with(|p| p.infos[0] = tensor_info(b"a", &[4, 2], 0, 32))),
        (
            "offsets_second_unpadded",
            with(|p| {
                p.infos[0] = tensor_info(b"a", &[3, 2], 0, 0);
                p.infos[1] = tensor_info(b"b", &[64], 8, 24);
            }),
        ),
        ("offsets_u64_max", with(|p| p.infos[1] = tensor_info(b"b", &[64], 8, u64::MAX))),
        (
            "offsets_swapped",
            with(|p| {
                p.infos[0] = tensor_info(b"a", &[4, 2], 0, 32);
                p.infos[1] = tensor_info(b"b", &[64], 8, 0);
            }),
        ),
        ("offsets_data_past_eof", with(|p| p.infos[1] = tensor_info(b"b", &[64, 2], 8, 32))),
        // alignment
        ("alignment_zero", with(|p| p.kvs[1] = kv_u32("general.alignment", 0))),
        ("alignment_not_power_of_two", with(|p| p.kvs[1] = kv_u32("general.alignment", 48))),
        ("alignment_wrong_type_u64", with(|p| p.kvs[1] = kv_raw(b"general.alignment", 10, &32u64.to_le_bytes()))),
        ("alignment_wrong_type_string", with(|p| p.kvs[1] = kv_str("general.alignment", "32"))),
        ("alignment_huge", with(|p| p.kvs[1] = kv_u32("general.alignment", 1 << 31))),
        // truncation
        ("truncation_in_kv", truncated(40)),
        ("truncation_in_tensor_table", truncated(table_start() + 10)),
        ("truncation_in_tensor_offset", truncated(table_start() + 40)),
        ("truncation_after_table", truncated(table_end())),
        ("truncation_in_last_tensor", truncated(valid_len - 1)),
    ]
}

#[test]
fn valid_base_file_parses() {
    let meta = GgufMeta::parse(&Parts::valid().bytes()).expect("the base of the malformed variants must be valid");
    assert_eq!(meta.tensors().len(), 2);
    assert_eq!(meta.get_str("general.architecture").unwrap(), "test");
    assert_eq!(meta.get_str_array("tokenizer.ggml.tokens").unwrap(), ["a", "bc"]);
}

#[test]
fn every_malformed_variant_is_rejected_with_an_offset() {
    let vs = variants();
    assert!(vs.len() >= 40, "corpus has {} variants", vs.len());
    let mut names = std::collections::HashSet::new();
    for (name, bytes) in &vs {
        assert!(names.insert(*name), "duplicate variant name {name}");
        match std::panic::catch_unwind(|| GgufMeta::parse(bytes)) {
            Ok(Ok(_)) => panic!("variant {name} was accepted"),
            Ok(Err(e)) => assert!(e.to_string().starts_with("byte "), "{name}: error lacks an offset: {e}"),
            Err(_) => panic!("variant {name} made the reader panic"),
        }
    }
}

#[test]
fn inspect_exits_1_with_one_line_on_every_malformed_variant() {
    let dir = common::root().join("target/malformed-gguf");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in variants() {
        let path = dir.join(format!("{name}.gguf"));
        std::fs::write(&path, &bytes).unwrap();
        let out = common::run_moellava(&["inspect", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: exit status {:?}, stderr {stderr}", out.status);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{name}: stderr is not one line: {stderr}");
        assert!(stderr.starts_with("error: ") && stderr.contains(&format!("{name}.gguf")), "{name}: {stderr}");
        assert!(out.stdout.is_empty(), "{name}: printed to stdout");
    }
}

#[test]
fn random_corruptions_never_panic() {
    // Deterministic LCG: flip bytes of the valid file and truncate at random; every result is either
    // a clean Ok or a clean Err. (The fuzz target explores this far more widely.)
    let base = Parts::valid().bytes();
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut next = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    for _ in 0..20_000 {
        let mut b = base.clone();
        for _ in 0..1 + next() % 4 {
            let i = next() % b.len();
            b[i] = (next() % 256) as u8;
        }
        if next() % 4 == 0 {
            b.truncate(next() % b.len());
        }
        let r = std::panic::catch_unwind(|| GgufMeta::parse(&b).map(|m| m.tensors().len()));
        assert!(r.is_ok(), "panic on {b:?}");
    }
}
