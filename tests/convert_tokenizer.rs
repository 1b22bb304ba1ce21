//! The runtime tokenizer, rebuilt from a converted GGUF, gives exactly the ids of the original
//! tokenizer files run through the reference libraries (transformers' slow CodeGenTokenizer for Phi,
//! tiktoken with the families' code-defined specials for StableLM and Qwen) on a corpus of prompts,
//! whitespace runs, digits, non-ASCII text and every special token.

mod common;

use common::Ckpt;
use moellava_runtime::gguf::GgufFile;
use moellava_runtime::tokenizer::Tokenizer;

#[test]
fn runtime_tokenizer_matches_the_reference_libraries() {
    let corpus_path = common::root().join("tests/fixtures/tokenizer_corpus.json");
    let corpus: Vec<String> = serde_json::from_str(&std::fs::read_to_string(&corpus_path).unwrap()).unwrap();
    for backbone in ["phi2", "stablelm", "qwen"] {
        let Some(dir) = common::checkpoint(Ckpt::moe(backbone, "clip"), &[]) else { return };
        let py = common::python().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let gguf = tmp.path().join("m.gguf");
        common::convert(&dir, &gguf, &["--type", "f16"]);
        let f = GgufFile::open(&gguf).unwrap();
        let tok = Tokenizer::from_gguf(&f.meta).unwrap();
        let ours: Vec<Vec<u32>> = corpus.iter().map(|s| tok.encode(s).unwrap()).collect();
        let ours_path = tmp.path().join("ours.json");
        std::fs::write(&ours_path, serde_json::to_string(&ours).unwrap()).unwrap();
        let model = dir.join("model");
        let out = common::run_python(
            &py,
            "tools/checks/tokenizer_reference.py",
            &[backbone, model.to_str().unwrap(), corpus_path.to_str().unwrap(), ours_path.to_str().unwrap()],
        );
        assert!(out.contains(&format!("{0}/{0} strings identical", corpus.len())), "{out}");
        // Decoding round-trips ordinary text.
        let text = "Is there a chair in the image? Yes, café 日本 🙂";
        assert_eq!(tok.decode(&tok.encode(text).unwrap(), true).unwrap(), text, "{backbone}");
    }
}
