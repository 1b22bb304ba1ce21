//! `moellava chat`: a multi-turn conversation about a picture.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use moellava_runtime::image::Rgb8;
use moellava_runtime::prompt::{self, Turn};

use super::options::{GenArgs, ModelArgs};

/// Talk with the model about a picture, turn by turn; the conversation history goes into every prompt
/// through the model's template.
///
/// Commands: `/image PATH` changes the picture (and starts a new conversation), `/reset` forgets the
/// conversation, Ctrl-D leaves. When stdin is not a terminal, each line is one turn.
///
/// Example: moellava chat -m phi2-q4.gguf --image cat.jpg
#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The picture to talk about.
    #[arg(long, value_name = "IMG")]
    pub image: Option<PathBuf>,
    #[command(flatten)]
    pub gen: GenArgs,
}

pub fn run(a: ChatArgs) -> Result<()> {
    let opts = a.gen.options()?;
    let mut image: Option<Rgb8> = a.image.as_ref().map(|p| moellava_runtime::image::load(p)).transpose()?;
    let (model, _) = a.model.load()?;
    let interactive = std::io::stdin().is_terminal();
    let mut turns: Vec<Turn> = Vec::new();
    let stdout = std::io::stdout();
    let prompt_user = |out: &mut dyn Write| {
        if interactive {
            let _ = write!(out, "USER: ");
            let _ = out.flush();
        }
    };
    prompt_user(&mut stdout.lock());
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let text = line.trim();
        if text.is_empty() {
            prompt_user(&mut stdout.lock());
            continue;
        }
        if text == "/reset" {
            turns.clear();
            eprintln!("(conversation reset)");
        } else if let Some(path) = text.strip_prefix("/image ") {
            match moellava_runtime::image::load(std::path::Path::new(path.trim())) {
                Ok(img) => {
                    image = Some(img);
                    turns.clear();
                    eprintln!("(new picture; conversation reset)");
                }
                Err(e) => eprintln!("error: {e}"),
            }
        } else {
            // The image tag goes into the first message of the conversation, as LLaVA's CLI does.
            let user = prompt::user_message(&model.config.chat, text, image.is_some() && turns.is_empty());
            turns.push(Turn { user, assistant: None });
            let full = prompt::render(&model.config.chat, &turns);
            if interactive {
                print!("ASSISTANT: ");
            }
            let result = model.prepare(&full, image.as_ref()).and_then(|input| {
                model.generate(input, &opts, &mut |piece| {
                    let mut out = stdout.lock();
                    let _ = out.write_all(piece.as_bytes());
                    let _ = out.flush();
                })
            });
            match result {
                Ok(ans) => {
                    println!();
                    if let Some(last) = turns.last_mut() {
                        last.assistant = Some(ans.text);
                    }
                }
                Err(e) => {
                    println!();
                    eprintln!("error: {e}");
                    turns.pop();
                }
            }
        }
        prompt_user(&mut stdout.lock());
    }
    if interactive {
        println!();
    }
    a.model.experts.print_report(&model);
    Ok(())
}
