//! [`Script`]: the directives a [`ScriptedEngine`](crate::ScriptedEngine) reads from a prompt.
//!
//! The prompt's plain text is split on whitespace; words of the form `key=value` with a known
//! key are directives, every other word is ignored (so a directive can sit inside ordinary
//! chat text). A known key with a malformed value is an error rather than silently ignored.
//! When a key repeats, the last one wins.
//!
//! | directive         | effect                                                                |
//! |-------------------|-----------------------------------------------------------------------|
//! | `tokens=N`        | stream N tokens (default `max_tokens`; capped at `max_tokens`)        |
//! | `delay_ms=M`      | sleep M ms before each token (cancellable)                            |
//! | `prefill_ms=M`    | sleep M ms in the prefill phase (cancellable)                         |
//! | `error_after=K`   | fail the generation after K tokens                                    |
//! | `exit_after=K:C`  | `exit(C)` the whole process after K tokens                            |
//! | `abort_after=K`   | SIGKILL the whole process after K tokens (like an OOM kill)           |
//! | `hang_after=K`    | wedge the generating thread forever after K tokens, ignoring cancel   |
//! | `freeze_after=K`  | freeze the host's heartbeat after K tokens, then keep streaming       |
//! | `max_context=N`   | a context of N positions: a prompt of more than N words fails with   |
//! |                   | `ContextLengthExceeded` before prefill (the client's error)           |

use std::time::Duration;

use crate::EngineError;

/// The parsed directives of one generate request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Script {
    /// `tokens=N`: how many tokens to stream (`None`: `max_tokens`).
    pub tokens: Option<u32>,
    /// `delay_ms=M`: pause before each token.
    pub delay: Duration,
    /// `prefill_ms=M`: pause in the prefill phase.
    pub prefill: Duration,
    /// `error_after=K`: return an error once K tokens were streamed.
    pub error_after: Option<u32>,
    /// `exit_after=K:CODE`: exit the process with CODE once K tokens were streamed.
    pub exit_after: Option<(u32, i32)>,
    /// `abort_after=K`: SIGKILL the process once K tokens were streamed.
    pub abort_after: Option<u32>,
    /// `hang_after=K`: wedge forever once K tokens were streamed.
    pub hang_after: Option<u32>,
    /// `freeze_after=K`: freeze the host's heartbeat once K tokens were streamed.
    pub freeze_after: Option<u32>,
    /// `max_context=N`: the context holds N positions; a longer prompt is refused.
    pub max_context: Option<usize>,
}

impl Script {
    /// Reads the directives out of a prompt's plain text.
    pub fn parse(text: &str) -> Result<Self, EngineError> {
        let mut script = Self::default();
        for word in text.split_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                "tokens" => script.tokens = Some(number(word, value)?),
                "delay_ms" => script.delay = Duration::from_millis(number(word, value)?),
                "prefill_ms" => script.prefill = Duration::from_millis(number(word, value)?),
                "error_after" => script.error_after = Some(number(word, value)?),
                "exit_after" => {
                    let (after, code) = value.split_once(':').ok_or_else(|| {
                        bad_directive(word, "expected `exit_after=TOKENS:EXIT_CODE`")
                    })?;
                    let code = code
                        .parse()
                        .map_err(|_| bad_directive(word, "the exit code must be an integer"))?;
                    script.exit_after = Some((number(word, after)?, code));
                }
                "abort_after" => script.abort_after = Some(number(word, value)?),
                "hang_after" => script.hang_after = Some(number(word, value)?),
                "freeze_after" => script.freeze_after = Some(number(word, value)?),
                "max_context" => script.max_context = Some(number(word, value)?),
                _ => {}
            }
        }
        Ok(script)
    }
}

fn number<T: std::str::FromStr>(word: &str, value: &str) -> Result<T, EngineError> {
    value
        .parse()
        .map_err(|_| bad_directive(word, "expected a non-negative whole number"))
}

fn bad_directive(word: &str, why: &str) -> EngineError {
    EngineError::InvalidRequest(format!("bad scripted directive {word:?}: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_prompt_has_no_directives() {
        assert_eq!(Script::parse("").ok(), Some(Script::default()));
    }

    #[test]
    fn parses_every_directive_and_ignores_other_words() {
        let script = Script::parse(
            "hello tokens=12\ndelay_ms=3 prefill_ms=40 error_after=5 exit_after=2:17 \
             abort_after=4 hang_after=6 freeze_after=1 max_context=9 foo=bar world",
        )
        .ok();
        assert_eq!(
            script,
            Some(Script {
                tokens: Some(12),
                delay: Duration::from_millis(3),
                prefill: Duration::from_millis(40),
                error_after: Some(5),
                exit_after: Some((2, 17)),
                abort_after: Some(4),
                hang_after: Some(6),
                freeze_after: Some(1),
                max_context: Some(9),
            })
        );
    }

    #[test]
    fn last_repeat_wins() {
        let script = Script::parse("tokens=1 tokens=9").ok();
        assert_eq!(script.and_then(|s| s.tokens), Some(9));
    }

    #[test]
    fn negative_exit_code_is_allowed() {
        let script = Script::parse("exit_after=0:-1").ok();
        assert_eq!(script.and_then(|s| s.exit_after), Some((0, -1)));
    }

    #[test]
    fn malformed_known_directives_are_errors() {
        for bad in [
            "tokens=many",
            "delay_ms=-1",
            "exit_after=3",
            "exit_after=x:1",
            "exit_after=1:x",
        ] {
            let err = Script::parse(bad).err().map(|e| e.to_string());
            let err = err.unwrap_or_default();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }
}
