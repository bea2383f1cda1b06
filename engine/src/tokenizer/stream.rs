//! [`TokenStream`]: decode tokens one at a time, emitting only complete UTF-8 text.
//!
//! A character can be split over several tokens (byte-level BPE spells an emoji as up to
//! four byte tokens; SentencePiece falls back to `<0xXX>` tokens), so a token on its own may
//! not be printable. The stream keeps the bytes of an unfinished character until the tokens
//! that complete it arrive, and emits everything before it. A byte sequence that can never
//! become valid UTF-8 is emitted as U+FFFD at once rather than held back.

use super::GgufTokenizer;

/// An incremental decoder: push ids as they are generated, get text as soon as it is whole.
///
/// Concatenating every [`push`](Self::push) result and then [`finish`](Self::finish) gives
/// exactly [`GgufTokenizer::decode`] of the same ids.
#[derive(Debug)]
pub struct TokenStream<'a> {
    tokenizer: &'a GgufTokenizer,
    state: StreamState,
}

impl<'a> TokenStream<'a> {
    pub(super) fn new(tokenizer: &'a GgufTokenizer) -> Self {
        Self {
            tokenizer,
            state: StreamState::new(tokenizer),
        }
    }

    /// Adds one token; returns the text it completes, if any. An id outside the vocabulary
    /// (a model whose output layer is wider than its vocabulary) decodes to nothing and is
    /// logged.
    pub fn push(&mut self, id: u32) -> Option<String> {
        self.state.push(self.tokenizer, id)
    }

    /// Ends the stream: whatever is left (an unfinished character) as text, with U+FFFD for
    /// the incomplete bytes.
    pub fn finish(&mut self) -> String {
        self.state.finish()
    }

    /// Whether bytes of an unfinished character are being held back.
    pub fn has_pending(&self) -> bool {
        self.state.has_pending()
    }
}

/// A [`TokenStream`]'s state without the borrow of its tokenizer, for holders that outlive a
/// borrow (a sequence in a batch); every call takes the tokenizer it was made for.
#[derive(Debug, Clone)]
pub struct StreamState {
    pending: Vec<u8>,
    strip_space: bool,
}

impl StreamState {
    /// A fresh stream over `tokenizer`.
    pub fn new(tokenizer: &GgufTokenizer) -> Self {
        Self {
            pending: Vec::new(),
            strip_space: tokenizer.strips_space_prefix(),
        }
    }

    /// [`TokenStream::push`], with the tokenizer this state was made for.
    pub fn push(&mut self, tokenizer: &GgufTokenizer, id: u32) -> Option<String> {
        let Some(piece) = tokenizer.piece(id) else {
            tracing::warn!(
                id,
                vocab_size = tokenizer.vocab_size(),
                "token id outside the vocabulary; decoded as nothing"
            );
            return None;
        };
        let atomic = tokenizer.is_atomic(id);
        let mut piece = piece;
        if self.strip_space && !atomic {
            if let Some(rest) = piece.strip_prefix(b" ") {
                piece = rest;
            }
            self.strip_space = false;
        }
        if atomic && tokenizer.strips_space_prefix() {
            self.strip_space = true;
        }
        self.pending.extend_from_slice(piece);
        let text = take_complete_utf8(&mut self.pending);
        (!text.is_empty()).then_some(text)
    }

    /// [`TokenStream::finish`].
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }

    /// [`TokenStream::has_pending`].
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

/// Removes and returns the longest prefix of `buf` that is complete text; invalid sequences
/// become U+FFFD, an unfinished character at the end stays in `buf`.
fn take_complete_utf8(buf: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut start = 0;
    loop {
        match std::str::from_utf8(&buf[start..]) {
            Ok(text) => {
                out.push_str(text);
                buf.clear();
                return out;
            }
            Err(err) => {
                let valid_end = start + err.valid_up_to();
                out.push_str(&String::from_utf8_lossy(&buf[start..valid_end]));
                match err.error_len() {
                    Some(bad) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        start = valid_end + bad;
                    }
                    None => {
                        buf.drain(..valid_end);
                        return out;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::take_complete_utf8;

    #[test]
    fn holds_back_an_unfinished_character() {
        let mut buf = "a👋".as_bytes()[..3].to_vec();
        assert_eq!(take_complete_utf8(&mut buf), "a");
        assert_eq!(buf.len(), 2);
        buf.extend_from_slice(&"👋".as_bytes()[2..]);
        assert_eq!(take_complete_utf8(&mut buf), "👋");
        assert!(buf.is_empty());
    }

    #[test]
    fn replaces_invalid_bytes_at_once() {
        let mut buf = vec![b'x', 0xFF, b'y', 0xE2];
        assert_eq!(take_complete_utf8(&mut buf), "x\u{FFFD}y");
        assert_eq!(buf, vec![0xE2]);
    }
}
