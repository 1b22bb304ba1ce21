//! The request side of `POST /v1/chat/completions`: OpenAI's chat schema (unknown fields ignored, as
//! OpenAI does), turned into one prompt in the model's template, at most one decoded image, and the
//! generation options. Every refusal names the field at fault.

use base64::Engine;
use moellava_runtime::image::{self, Rgb8};
use moellava_runtime::model::config::ChatTemplate;
use moellava_runtime::prompt::{self, Turn};
use moellava_runtime::sampler::SamplingOptions;
use moellava_runtime::GenerateOptions;
use serde::Deserialize;

use crate::error::ApiError;

/// What a request may hold (`moellava serve --max-*`).
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Decoded bytes of one image file.
    pub max_image_bytes: usize,
    pub max_image_pixels: u64,
}

/// OpenAI's stop-string cap.
const MAX_STOPS: usize = 4;
/// The model takes one picture per conversation (one `<image>` tag).
pub const MAX_IMAGES: usize = 1;

#[derive(Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<usize>,
    /// Extensions (llama.cpp's server takes the same names).
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
    /// Extension (llama.cpp's name): generate `max_tokens` tokens whatever they are (benchmarks).
    pub ignore_eos: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    pub image_url: Option<ImageUrl>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum ImageUrl {
    Object { url: String },
    Plain(String),
}

/// One request, ready for the scheduler.
pub struct JobSpec {
    pub prompt: String,
    pub image: Option<Rgb8>,
    pub options: GenerateOptions,
    /// `max_tokens`; `None`: as many as the context leaves, up to the server's default.
    pub max_tokens: Option<usize>,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Parses and checks a request body against `template` and `limits` (images are decoded here).
pub fn parse(body: &[u8], template: &ChatTemplate, limits: &Limits) -> Result<JobSpec, ApiError> {
    let req: ChatRequest = serde_json::from_slice(body).map_err(|e| {
        let what =
            if e.is_syntax() || e.is_eof() { "the body is not valid JSON" } else { "the request does not fit the chat schema" };
        ApiError::invalid(None, format!("{what}: {e}"))
    })?;
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(Some("n".into()), "only n = 1 is supported"));
    }
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    if max_tokens == Some(0) {
        return Err(ApiError::invalid(Some("max_tokens".into()), "max_tokens must be at least 1"));
    }
    let sampling = SamplingOptions {
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p.unwrap_or(1.0),
        top_k: req.top_k.unwrap_or(0),
        repetition_penalty: req.repetition_penalty.unwrap_or(1.0),
        seed: req.seed.unwrap_or_else(random_seed),
    };
    sampling.validate().map_err(|e| ApiError::invalid(Some("temperature".into()), e))?;
    if sampling.temperature > 2.0 {
        return Err(ApiError::invalid(Some("temperature".into()), "temperature must be between 0 and 2"));
    }
    let stops = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stops.len() > MAX_STOPS {
        return Err(ApiError::invalid(Some("stop".into()), format!("at most {MAX_STOPS} stop strings (got {})", stops.len())));
    }
    let (prompt, image) = conversation(&req.messages, template, limits)?;
    Ok(JobSpec {
        prompt,
        image,
        options: GenerateOptions { sampling, ignore_eos: req.ignore_eos.unwrap_or(false), ..GenerateOptions::default() },
        max_tokens,
        stops,
        stream: req.stream.unwrap_or(false),
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// The prompt (system messages replace the template's system text; each user message opens a turn,
/// an assistant message answers it) and the conversation's one image.
fn conversation(messages: &[Message], template: &ChatTemplate, limits: &Limits) -> Result<(String, Option<Rgb8>), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(Some("messages".into()), "messages must not be empty"));
    }
    let mut t = template.clone();
    let mut system: Vec<String> = Vec::new();
    let mut turns: Vec<Turn> = Vec::new();
    let mut image: Option<Rgb8> = None;
    for (i, m) in messages.iter().enumerate() {
        let param = |rest: &str| Some(format!("messages[{i}]{rest}"));
        let (text, img) = content(m.content.as_ref(), i, limits)?;
        if img.is_some() && m.role != "user" {
            return Err(ApiError::invalid(param(".content"), "only user messages may hold an image"));
        }
        match m.role.as_str() {
            "system" | "developer" => system.push(text),
            "user" => {
                let with_image = img.is_some();
                if let Some(img) = img {
                    if image.replace(img).is_some() {
                        return Err(ApiError::invalid(
                            param(".content"),
                            format!("at most {MAX_IMAGES} image per conversation (the model sees one picture)"),
                        ));
                    }
                }
                let user = prompt::user_message(&t, &text, with_image);
                match turns.last_mut() {
                    Some(last) if last.assistant.is_none() => last.user = format!("{}\n{user}", last.user),
                    _ => turns.push(Turn { user, assistant: None }),
                }
            }
            "assistant" => match turns.last_mut() {
                Some(last) if last.assistant.is_none() => last.assistant = Some(text),
                _ => return Err(ApiError::invalid(param(".role"), "an assistant message must follow a user message")),
            },
            other => {
                return Err(ApiError::invalid(
                    param(".role"),
                    format!("unsupported role `{other}` (expected system, user or assistant)"),
                ))
            }
        }
    }
    if turns.last().is_none_or(|l| l.assistant.is_some()) {
        return Err(ApiError::invalid(Some("messages".into()), "the last message must be a user message"));
    }
    if !system.is_empty() {
        t.system = system.join("\n");
    }
    Ok((prompt::render(&t, &turns), image))
}

/// A message's text (its text parts joined by newlines) and its image, if any.
fn content(c: Option<&Content>, i: usize, limits: &Limits) -> Result<(String, Option<Rgb8>), ApiError> {
    let parts = match c {
        None => return Ok((String::new(), None)),
        Some(Content::Text(s)) => return Ok((s.clone(), None)),
        Some(Content::Parts(p)) => p,
    };
    let (mut texts, mut image) = (Vec::new(), None);
    for (j, p) in parts.iter().enumerate() {
        let param = |rest: &str| Some(format!("messages[{i}].content[{j}]{rest}"));
        match (p.kind.as_str(), &p.text, &p.image_url) {
            ("text", Some(t), _) => texts.push(t.clone()),
            ("image_url", _, Some(u)) => {
                let url = match u {
                    ImageUrl::Object { url } | ImageUrl::Plain(url) => url,
                };
                if image.is_some() {
                    return Err(ApiError::invalid(
                        param(""),
                        format!("at most {MAX_IMAGES} image per conversation (the model sees one picture)"),
                    ));
                }
                image = Some(data_url_image(url, limits).map_err(|e| ApiError { param: param(".image_url"), ..e })?);
            }
            ("text", None, _) => return Err(ApiError::invalid(param(".text"), "a text part needs `text`")),
            ("image_url", _, None) => return Err(ApiError::invalid(param(".image_url"), "an image_url part needs `image_url`")),
            (other, _, _) => {
                return Err(ApiError::invalid(
                    param(".type"),
                    format!("unsupported content part `{other}` (expected text or image_url)"),
                ))
            }
        }
    }
    Ok((texts.join("\n"), image))
}

/// Decodes a `data:image/...;base64,` URL; the server fetches nothing, so other URLs are refused.
fn data_url_image(url: &str, limits: &Limits) -> Result<Rgb8, ApiError> {
    let refuse = |m: String| ApiError::invalid(None, m);
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(refuse(
            "remote image URLs are refused: the server fetches nothing; send the image inline as a data:image/...;base64, URL"
                .into(),
        )
        .with_code("remote_image_refused"));
    }
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(refuse("image_url must be a data:image/...;base64, URL".into()));
    };
    let Some((media, payload)) = rest.split_once(',') else {
        return Err(refuse("the data URL has no `,` before its payload".into()));
    };
    if !media.starts_with("image/") || !media.ends_with(";base64") {
        return Err(refuse(format!("the data URL is `data:{media},…`; expected data:image/<type>;base64,…")));
    }
    // Base64 is 4 characters per 3 bytes: refuse an oversized image before decoding it.
    if payload.len() / 4 * 3 > limits.max_image_bytes + 3 {
        return Err(refuse(format!(
            "the image is about {} bytes, over the {}-byte limit (--max-image-bytes)",
            payload.len() / 4 * 3,
            limits.max_image_bytes
        ))
        .with_code("image_too_large"));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| refuse(format!("the image's base64 does not decode: {e}")).with_code("invalid_base64"))?;
    if bytes.len() > limits.max_image_bytes {
        return Err(refuse(format!(
            "the image is {} bytes, over the {}-byte limit (--max-image-bytes)",
            bytes.len(),
            limits.max_image_bytes
        ))
        .with_code("image_too_large"));
    }
    image::decode_limited(&bytes, "image_url", limits.max_image_pixels)
        .map_err(|e| ApiError::from_runtime(&e).with_code("invalid_image"))
}

fn random_seed() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    t.as_nanos() as u64 ^ (std::process::id() as u64) << 32
}
