//! Length-prefixed MessagePack framing.
//!
//! A frame is a 4-byte big-endian body length followed by that many bytes of MessagePack
//! (rmp-serde, struct-as-map so that fields can be added compatibly). The same rules are
//! offered two ways: [`FrameCodec`] for tokio streams (the supervisor side) and
//! [`read_frame`] / [`write_frame`] for blocking `std::io` streams (the runner side, which
//! keeps its heartbeat on a plain OS thread). Both refuse a frame over the length limit before
//! reading its body, so a garbage prefix cannot make us allocate gigabytes.

use std::io::{Read, Write};
use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::codec::{Decoder, Encoder};

use crate::ProtoError;

/// The largest frame body accepted by default: 16 MiB.
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

const PREFIX_LEN: usize = 4;

/// Encodes one message as a complete frame (prefix included).
pub fn encode_frame<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, ProtoError> {
    let body = rmp_serde::to_vec_named(msg).map_err(|e| ProtoError::Encode(e.to_string()))?;
    if body.len() > max {
        return Err(ProtoError::FrameTooLarge {
            len: body.len(),
            max,
        });
    }
    let len = u32::try_from(body.len()).map_err(|_| ProtoError::FrameTooLarge {
        len: body.len(),
        max,
    })?;
    let mut out = Vec::with_capacity(PREFIX_LEN + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes one frame body (without its prefix) into a message.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ProtoError> {
    rmp_serde::from_slice(body).map_err(|e| ProtoError::Malformed(e.to_string()))
}

fn check_len(prefix: [u8; PREFIX_LEN], max: usize) -> Result<usize, ProtoError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(ProtoError::FrameTooLarge { len, max });
    }
    Ok(len)
}

/// Reads one frame from a blocking reader.
///
/// Returns `Ok(None)` on a clean end of stream at a frame boundary, and
/// [`ProtoError::Truncated`] when the stream ends inside a frame.
pub fn read_frame<T: DeserializeOwned, R: Read>(
    reader: &mut R,
    max: usize,
) -> Result<Option<T>, ProtoError> {
    let mut prefix = [0u8; PREFIX_LEN];
    let got = read_full(reader, &mut prefix)?;
    if got == 0 {
        return Ok(None);
    }
    if got < PREFIX_LEN {
        return Err(ProtoError::Truncated {
            got,
            expected: PREFIX_LEN,
        });
    }
    let len = check_len(prefix, max)?;
    let mut body = vec![0u8; len];
    let got = read_full(reader, &mut body)?;
    if got < len {
        return Err(ProtoError::Truncated {
            got: PREFIX_LEN + got,
            expected: PREFIX_LEN + len,
        });
    }
    decode_body(&body).map(Some)
}

/// Reads until `buf` is full or the stream ends; returns how many bytes were read.
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> Result<usize, ProtoError> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(filled)
}

/// Writes one frame to a blocking writer and flushes it.
pub fn write_frame<T: Serialize, W: Write>(
    writer: &mut W,
    msg: &T,
    max: usize,
) -> Result<(), ProtoError> {
    let frame = encode_frame(msg, max)?;
    writer.write_all(&frame)?;
    writer.flush()?;
    Ok(())
}

/// A tokio codec that decodes frames into `In` messages and encodes `Out` messages.
///
/// Used with `FramedRead` / `FramedWrite` on a child's stdout / stdin.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    max: usize,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec with the default [`MAX_FRAME_LEN`] limit.
    pub fn new() -> Self {
        Self::with_max(MAX_FRAME_LEN)
    }

    /// A codec with an explicit frame body limit.
    pub fn with_max(max: usize) -> Self {
        Self {
            max,
            _types: PhantomData,
        }
    }
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        Self::new()
    }
}

impl<In: DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, ProtoError> {
        if src.len() < PREFIX_LEN {
            src.reserve(PREFIX_LEN - src.len());
            return Ok(None);
        }
        let mut prefix = [0u8; PREFIX_LEN];
        prefix.copy_from_slice(&src[..PREFIX_LEN]);
        let len = check_len(prefix, self.max)?;
        if src.len() < PREFIX_LEN + len {
            src.reserve(PREFIX_LEN + len - src.len());
            return Ok(None);
        }
        src.advance(PREFIX_LEN);
        let body = src.split_to(len);
        decode_body(&body).map(Some)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<In>, ProtoError> {
        match self.decode(src)? {
            Some(msg) => Ok(Some(msg)),
            None if src.is_empty() => Ok(None),
            None => {
                let expected = if src.len() < PREFIX_LEN {
                    PREFIX_LEN
                } else {
                    let mut prefix = [0u8; PREFIX_LEN];
                    prefix.copy_from_slice(&src[..PREFIX_LEN]);
                    PREFIX_LEN + u32::from_be_bytes(prefix) as usize
                };
                Err(ProtoError::Truncated {
                    got: src.len(),
                    expected,
                })
            }
        }
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = ProtoError;

    fn encode(&mut self, msg: Out, dst: &mut BytesMut) -> Result<(), ProtoError> {
        let frame = encode_frame(&msg, self.max)?;
        dst.reserve(frame.len());
        dst.put_slice(&frame);
        Ok(())
    }
}
