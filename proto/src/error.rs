//! Errors produced while framing or decoding protocol messages.

/// Why a frame could not be read, written or decoded.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The peer announced a frame larger than the limit; the stream cannot be trusted after it.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// The announced length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({got} of {expected} bytes)")]
    Truncated {
        /// Bytes received for the frame (prefix included).
        got: usize,
        /// Bytes the frame should have had (prefix included).
        expected: usize,
    },
    /// The frame body is not a valid MessagePack encoding of the expected message.
    #[error("malformed frame body: {0}")]
    Malformed(String),
    /// A message could not be encoded (should not happen for protocol types).
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The first frame was not a handshake, or its magic string was wrong.
    #[error("bad handshake: {0}")]
    BadHandshake(String),
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: we speak {ours}, the peer speaks {theirs}")]
    VersionMismatch {
        /// Our [`crate::PROTOCOL_VERSION`].
        ours: u32,
        /// The version the peer announced.
        theirs: u32,
    },
    /// An I/O error on the underlying pipe or socket.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}
