//! Prompts as MoE-LLaVA builds them (spec §5.2–5.3): the conversation template (SeparatorStyle.TWO)
//! and `tokenizer_image_token` — the prompt split at the image tag, every chunk tokenised separately
//! (no BOS), the image features spliced where the tag was.

use crate::error::{Result, RuntimeError};
use crate::model::config::ChatTemplate;
use crate::tokenizer::Tokenizer;

/// One turn: the user's message and, for past turns, the assistant's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Turn {
    pub user: String,
    pub assistant: Option<String>,
}

/// `system + sep + "USER: " + msg + sep + "ASSISTANT:"`; past answers end with sep2.
pub fn render(t: &ChatTemplate, turns: &[Turn]) -> String {
    let mut s = format!("{}{}", t.system, t.sep);
    for turn in turns {
        s.push_str(&format!("{}: {}{}", t.roles[0], turn.user, t.sep));
        match &turn.assistant {
            Some(a) => s.push_str(&format!("{}: {}{}", t.roles[1], a, t.sep2)),
            None => s.push_str(&format!("{}:", t.roles[1])),
        }
    }
    s
}

/// A single question, with `<image>\n` in front when there is an image (model_vqa_loader.py).
pub fn user_message(t: &ChatTemplate, question: &str, with_image: bool) -> String {
    if with_image {
        format!("{}\n{question}", t.image_token)
    } else {
        question.to_string()
    }
}

/// Token ids with the image's place marked.
#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    Text(Vec<u32>),
    Image,
}

/// Splits `prompt` at the image tag and tokenises each chunk on its own.
pub fn tokenize(tok: &Tokenizer, prompt: &str, image_token: &str) -> Result<Vec<Piece>> {
    let chunks: Vec<&str> = prompt.split(image_token).collect();
    if chunks.len() > 2 {
        return Err(RuntimeError::Prompt(format!(
            "the prompt holds {} '{image_token}' tags; at most one image is supported",
            chunks.len() - 1
        )));
    }
    let mut pieces = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        if i > 0 {
            pieces.push(Piece::Image);
        }
        let ids = tok.encode(c)?;
        if !ids.is_empty() {
            pieces.push(Piece::Text(ids));
        }
    }
    Ok(pieces)
}

/// Ids with -200 for the image, as the reference's `input_ids` (fixtures and `--json`).
pub fn flat_ids(pieces: &[Piece]) -> Vec<i64> {
    pieces
        .iter()
        .flat_map(|p| match p {
            Piece::Text(ids) => ids.iter().map(|i| *i as i64).collect::<Vec<_>>(),
            Piece::Image => vec![-200],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> ChatTemplate {
        ChatTemplate {
            system: "SYS".into(),
            roles: ["USER".into(), "ASSISTANT".into()],
            sep: " ".into(),
            sep2: "<|endoftext|>".into(),
            image_token: "<image>".into(),
        }
    }

    #[test]
    fn renders_like_conversation_py() {
        let t = template();
        let one = render(&t, &[Turn { user: user_message(&t, "Is there a dog?", true), assistant: None }]);
        assert_eq!(one, "SYS USER: <image>\nIs there a dog? ASSISTANT:");
        let two =
            render(&t, &[Turn { user: "a".into(), assistant: Some("b".into()) }, Turn { user: "c".into(), assistant: None }]);
        assert_eq!(two, "SYS USER: a ASSISTANT: b<|endoftext|>USER: c ASSISTANT:");
    }
}
