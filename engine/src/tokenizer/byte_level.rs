//! The GPT-2 byte-level alphabet: the reversible map between the 256 byte values and the
//! printable characters that byte-level BPE vocabularies spell their tokens with
//! (`Ġ` for a space, `Ċ` for a newline, ...).

use std::sync::OnceLock;

/// Characters of the alphabet are all below this code point (the 68 unprintable bytes are
/// moved to U+0100..U+0143).
const ALPHABET_END: usize = 0x144;

/// `REVERSE[c]` is the byte that character `c` stands for, or `None`.
fn char_to_byte_table() -> &'static [Option<u8>; ALPHABET_END] {
    static TABLE: OnceLock<[Option<u8>; ALPHABET_END]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut table = [None; ALPHABET_END];
        let mut next_unprintable = 0x100usize;
        for b in 0u8..=255 {
            let code = if printable(b) {
                usize::from(b)
            } else {
                next_unprintable += 1;
                next_unprintable - 1
            };
            if let Some(slot) = table.get_mut(code) {
                *slot = Some(b);
            }
        }
        table
    })
}

/// The byte a byte-level character stands for, if it is one of the 256.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let code = usize::try_from(u32::from(c)).ok()?;
    char_to_byte_table().get(code).copied().flatten()
}

/// The raw bytes a byte-level token spells. A character outside the alphabet (which a
/// well-formed vocabulary does not have) is kept as its own UTF-8.
pub(crate) fn token_to_bytes(token: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(token.len());
    for c in token.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_covers_every_byte_once() {
        let mut seen = [false; 256];
        for c in (0u32..ALPHABET_END as u32).filter_map(char::from_u32) {
            if let Some(b) = char_to_byte(c) {
                assert!(!seen[usize::from(b)], "byte {b} mapped twice");
                seen[usize::from(b)] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(char_to_byte('Ġ'), Some(b' '));
        assert_eq!(char_to_byte('Ċ'), Some(b'\n'));
        assert_eq!(char_to_byte('a'), Some(b'a'));
        assert_eq!(char_to_byte(' '), None);
        assert_eq!(token_to_bytes("Ġhello"), b" hello");
    }
}
