//! Line-based prompts for `--interactive`: questions on stderr, answers from
//! any `BufRead` (a terminal or a pipe), each answer validated before the
//! next question.

use std::io::{BufRead, Write};

use anyhow::{Context, bail};

/// How many times a question is asked again after an invalid answer.
const MAX_TRIES: usize = 5;

pub struct Prompter<R, W> {
    input: R,
    output: W,
}

impl<R: BufRead, W: Write> Prompter<R, W> {
    pub fn new(input: R, output: W) -> Self {
        Prompter { input, output }
    }

    /// Ask `question`; an empty answer takes `default`. `parse` validates the
    /// answer; on error the reason is shown and the question asked again.
    pub fn ask<T>(
        &mut self,
        question: &str,
        default: Option<&str>,
        mut parse: impl FnMut(&str) -> Result<T, String>,
    ) -> anyhow::Result<T> {
        for _ in 0..MAX_TRIES {
            match default {
                Some(d) if !d.is_empty() => write!(self.output, "{question} [{d}]: "),
                _ => write!(self.output, "{question}: "),
            }
            .and_then(|()| self.output.flush())
            .context("writing the prompt")?;
            let mut line = String::new();
            let read = self.input.read_line(&mut line).context("reading an answer")?;
            if read == 0 {
                bail!("input ended while asking: {question}");
            }
            let answer = line.trim();
            let answer = if answer.is_empty() { default.unwrap_or("") } else { answer };
            match parse(answer) {
                Ok(value) => return Ok(value),
                Err(reason) => writeln!(self.output, "  {reason}").context("writing the prompt")?,
            }
        }
        bail!("no valid answer after {MAX_TRIES} tries: {question}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_retries_and_end_of_input() {
        let input = b"\nnot-a-number\n42\n" as &[u8];
        let mut out = Vec::new();
        let mut p = Prompter::new(input, &mut out);
        let a: String = p.ask("name", Some("lab"), |s| Ok(s.to_string())).unwrap();
        assert_eq!(a, "lab");
        let b: u32 = p.ask("count", None, |s| s.parse().map_err(|_| format!("`{s}` is not a number"))).unwrap();
        assert_eq!(b, 42);
        let err = p.ask("more", None, |s| Ok(s.to_string())).unwrap_err();
        assert!(err.to_string().contains("input ended"), "{err}");
        let shown = String::from_utf8(out).unwrap();
        assert!(shown.contains("name [lab]: ") && shown.contains("`not-a-number` is not a number"), "{shown}");
    }
}
