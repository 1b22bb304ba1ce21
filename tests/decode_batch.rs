//! Continuous batching must not change any answer: several sequences decoded together (joining at
//! different steps, at different positions, with and without an image) get, at every step, the very
//! logits — bit for bit — and tokens that each gets decoded alone, on all three families.

mod common;

use std::path::Path;

use common::Ckpt;
use moellava_runtime::image;
use moellava_runtime::model::attention::KvCache;
use moellava_runtime::model::llm::Trace;
use moellava_runtime::model::moe::Gating;
use moellava_runtime::model::{GenerateOptions, Model, Sequence};

const NEW_TOKENS: usize = 6;

struct Request {
    question: &'static str,
    image: bool,
    /// The decode step at which it joins the batch.
    joins_at: usize,
}

const REQUESTS: [Request; 3] = [
    Request { question: "What is in the picture?", image: true, joins_at: 0 },
    Request { question: "Say something.", image: false, joins_at: 0 },
    Request { question: "Describe a long and winding road through the hills.", image: false, joins_at: 2 },
];

fn options() -> GenerateOptions {
    GenerateOptions { max_new_tokens: NEW_TOKENS, ignore_eos: true, ..GenerateOptions::default() }
}

/// The sequence and the logits of its prompt's last position.
fn start(m: &Model, r: &Request) -> (Sequence<moellava_runtime::backend::cpu::CpuBackend>, Vec<f32>) {
    let img = image::load(&common::root().join("tests/fixtures/images/wide.png")).unwrap();
    let prompt = m.question_prompt(r.question, r.image);
    let input = m.prepare(&prompt, r.image.then_some(&img)).unwrap();
    let mut seq = m.new_sequence(&input, &options(), &[]).unwrap();
    let logits = m.forward(input.embeds, &mut seq.cache, &mut Gating::Deterministic, &mut Trace::default()).unwrap();
    (seq, logits)
}

/// Per decode step, the logits a sequence decoded alone sees.
fn alone(m: &Model, r: &Request) -> (Vec<u32>, Vec<Vec<f32>>) {
    let (mut seq, mut logits) = start(m, r);
    let mut seen = vec![logits.clone()];
    while let (_, Some(next)) = seq.accept(&m.tokenizer, &logits).unwrap() {
        logits = m.decode_rows(&[next], &mut [&mut seq.cache]).unwrap().remove(0);
        seen.push(logits.clone());
    }
    (seq.tokens, seen)
}

fn batched(m: &Model) -> Vec<(Vec<u32>, Vec<Vec<f32>>)> {
    let mut seqs: Vec<Option<(Sequence<_>, Vec<f32>)>> = REQUESTS.iter().map(|_| None).collect();
    let mut seen: Vec<Vec<Vec<f32>>> = vec![Vec::new(); REQUESTS.len()];
    let mut done = vec![None; REQUESTS.len()];
    for step in 0.. {
        for (i, r) in REQUESTS.iter().enumerate() {
            if r.joins_at == step {
                let (seq, logits) = start(m, r);
                seen[i].push(logits.clone());
                seqs[i] = Some((seq, logits));
            }
        }
        let (mut feed, mut who) = (Vec::new(), Vec::new());
        for (i, slot) in seqs.iter_mut().enumerate() {
            if let Some((seq, logits)) = slot {
                match seq.accept(&m.tokenizer, logits).unwrap().1 {
                    Some(t) => {
                        feed.push(t);
                        who.push(i);
                    }
                    None => done[i] = slot.take().map(|(s, _)| s.tokens),
                }
            }
        }
        if who.is_empty() && done.iter().all(Option::is_some) {
            break;
        }
        let mut caches: Vec<&mut KvCache<_>> = Vec::new();
        for (i, slot) in seqs.iter_mut().enumerate() {
            if who.contains(&i) {
                caches.push(&mut slot.as_mut().unwrap().0.cache);
            }
        }
        let out = m.decode_rows(&feed, &mut caches).unwrap();
        for (i, logits) in who.iter().zip(out) {
            seen[*i].push(logits.clone());
            seqs[*i].as_mut().unwrap().1 = logits;
        }
    }
    done.into_iter().zip(seen).map(|(t, s)| (t.unwrap(), s)).collect()
}

fn check(path: &Path, label: &str) {
    let m = Model::load(path).unwrap();
    let together = batched(&m);
    for (r, (tokens, seen)) in REQUESTS.iter().zip(together) {
        let (alone_tokens, alone_seen) = alone(&m, r);
        assert_eq!(tokens, alone_tokens, "{label}: {:?}", r.question);
        assert_eq!(tokens.len(), NEW_TOKENS);
        assert_eq!(seen.len(), alone_seen.len());
        for (step, (a, b)) in seen.iter().zip(&alone_seen).enumerate() {
            assert!(a == b, "{label}: {:?} step {step}: batched logits differ from alone", r.question);
        }
        // And `generate`, the one-sequence loop, gives the same tokens.
        let img = image::load(&common::root().join("tests/fixtures/images/wide.png")).unwrap();
        let ans = m.answer(r.image.then_some(&img), r.question, false, &options(), &mut |_| {}).unwrap();
        assert_eq!(ans.tokens, alone_tokens, "{label}: generate");
    }
}

#[test]
fn batched_decode_equals_each_sequence_alone() {
    let tmp = tempfile::tempdir().unwrap();
    for backbone in ["phi2", "stablelm", "qwen"] {
        let Some(dir) = common::checkpoint(Ckpt::moe(backbone, "clip"), &[]) else { return };
        for (plan, args) in [("q4", &["--preset", "q4"][..]), ("f16", &["--type", "f16"][..])] {
            let out = tmp.path().join(format!("{backbone}-{plan}.gguf"));
            common::convert(&dir, &out, args);
            check(&out, &format!("{backbone} {plan}"));
        }
    }
}
