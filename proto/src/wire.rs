//! The node-to-node data plane protocol: frames, their binary codec, and the
//! codes a peer closes a connection or resets a stream with.
//!
//! A frame on a QUIC stream is a `u32` big-endian length followed by that many
//! bytes of body; the body is a one-byte tag and the message's fields, all
//! integers big-endian. The codec is hand written and pure (no I/O).
//!
//! Conversation (one QUIC connection between two nodes):
//! 1. The dialer opens the first bidirectional stream and sends [`Hello`]
//!    (version, its node id, its join proof); the listener answers with its
//!    own [`Hello`] or with [`Frame::Error`] (e.g. an incompatible version),
//!    or closes the connection with a [`CloseCode`].
//! 2. Then each request is a new bidirectional stream from the dialer: one
//!    request frame ([`GetRange`], or `Have`), answered by one frame
//!    ([`RangeHeader`], or `HaveReply`). A `RangeHeader` with status `Ok` is
//!    followed on the same stream by exactly `len` raw bytes, then the end of
//!    the stream. A sender that fails mid-body resets the stream with a
//!    [`ResetCode`] instead of finishing it.
//!
//! Invariants:
//! - Decoding never panics and never allocates more than [`MAX_FRAME_LEN`]:
//!   a length prefix is checked by [`frame_len`] before the body is read, and
//!   every count inside a body is checked against the bytes that remain.
//! - A decoded value is well formed: ranges are non-empty, sorted and
//!   disjoint; a piece bitmap has exactly one bit per piece.
//! - Frozen across versions, so two versions can always tell each other they
//!   disagree: the frame header, tag 1 (`Hello`) starting with its `u16`
//!   version, and tag 2 (`Error`) with code 5 (`IncompatibleVersion`). A
//!   `Hello` of another version decodes to [`WireError::IncompatibleVersion`]
//!   without reading past the version.

use std::fmt;

use crate::digest::{BlobId, Digest, DigestAlgorithm};
use crate::node_id::{NodeId, NODE_ID_LEN};

/// The version this build speaks; peers must speak the same.
pub const PROTOCOL_VERSION: u16 = 1;

/// The TLS ALPN protocol name of the data plane.
pub const ALPN: &[u8] = b"shoal-data/1";

/// Largest frame body accepted (raw range bytes are not frames).
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Bytes of the length prefix.
pub const FRAME_HEADER_LEN: usize = 4;

/// Most ranges a `NotPresent` answer lists (the first ones in the request).
pub const MAX_AVAILABLE_RANGES: usize = 256;

/// Length of a join proof (HMAC-SHA256).
pub const JOIN_PROOF_LEN: usize = 32;

/// One frame body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Error(ErrorCode),
    GetRange(GetRange),
    RangeHeader(RangeHeader),
    Have {
        blob: BlobId,
    },
    /// `None`: the peer does not hold the blob.
    HaveReply(Option<PieceMap>),
}

/// First message of each side of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    /// Must equal the node id of the sender's TLS certificate.
    pub node: NodeId,
    /// HMAC-SHA256 proving the sender holds the cluster's join secret.
    pub proof: [u8; JOIN_PROOF_LEN],
}

/// Ask for `len` bytes of `blob` at `offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetRange {
    pub blob: BlobId,
    pub offset: u64,
    pub len: u64,
}

/// The answer to a [`GetRange`]. With status `Ok`, `len` raw bytes follow:
/// the committed prefix of the requested range (`len` may be less than asked
/// when the holder's committed bytes end sooner, never more). Otherwise
/// `len` is 0 and nothing follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeHeader {
    pub status: RangeStatus,
    pub len: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangeStatus {
    Ok,
    /// The first requested byte is not held. `available`: the held parts of
    /// the requested range as `(start, end)` pairs, at most
    /// [`MAX_AVAILABLE_RANGES`] of them; `size`: the blob's size.
    NotPresent {
        size: u64,
        available: Vec<(u64, u64)>,
    },
    /// Every upload slot is taken; ask someone else or later.
    Busy,
    /// The blob is not held at all.
    NotFound,
    Error(ErrorCode),
}

/// Which pieces of a blob a peer holds completely (verified).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PieceMap {
    pub size: u64,
    pub piece_size: u64,
    pub complete: bool,
    /// One bit per piece, piece 0 in the high bit of byte 0.
    pub bitmap: Vec<u8>,
}

/// An error a peer reports in a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    Internal,
    /// The request was malformed or not allowed at this point.
    BadRequest,
    /// The holder found its copy corrupt (and dropped it).
    Corrupt,
    /// The requested range is outside the blob's `size` bytes.
    OutOfRange {
        size: u64,
    },
    IncompatibleVersion {
        ours: u16,
        theirs: u16,
    },
    /// The join proof did not verify.
    JoinRefused,
    /// A code from a newer peer.
    Unknown(u16),
}

/// QUIC application codes a connection is closed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseCode {
    /// Shutdown or idle: nothing wrong.
    Normal,
    /// The peer did not prove it holds the join secret.
    JoinRefused,
    IncompatibleVersion,
    /// A frame was malformed or out of place.
    Protocol,
    /// The handshake did not finish in time.
    HandshakeTimeout,
    Unknown(u32),
}

/// QUIC application codes a stream is reset (or stopped) with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetCode {
    /// The holder's copy turned out corrupt mid-transfer.
    Corrupt,
    /// The holder failed to read its copy.
    Internal,
    /// The node is shutting down.
    Shutdown,
    /// The receiver lost interest (dropped the stream).
    Cancelled,
    Unknown(u32),
}

/// Why bytes are not a valid frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("frame ends early while reading {what}")]
    Truncated { what: &'static str },
    #[error("{extra} unexpected bytes after a {what} frame")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("unknown frame tag {tag}")]
    UnknownTag { tag: u8 },
    #[error("invalid {what}")]
    Invalid { what: &'static str },
    #[error("peer speaks protocol version {theirs}, this node {ours}")]
    IncompatibleVersion { ours: u16, theirs: u16 },
}

/// The body length announced by a frame header, checked against
/// [`MAX_FRAME_LEN`] before anything is allocated.
pub fn frame_len(header: [u8; FRAME_HEADER_LEN]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(WireError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    Ok(len)
}

/// Appends `frame` with its length prefix to `out`. Encoding a frame whose
/// body exceeds [`MAX_FRAME_LEN`] (more ranges or pieces than a frame holds)
/// is an error.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) -> Result<(), WireError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    encode_body(frame, out)?;
    let len = out.len() - start - FRAME_HEADER_LEN;
    if len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(WireError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    out[start..start + FRAME_HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// `frame` with its length prefix, as a new buffer.
pub fn to_bytes(frame: &Frame) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    encode(frame, &mut out)?;
    Ok(out)
}

/// Decodes one frame body (without its length prefix).
pub fn decode(body: &[u8]) -> Result<Frame, WireError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(WireError::TooLarge {
            len: body.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let mut r = Reader { buf: body };
    let frame = match r.u8("tag")? {
        tag::HELLO => Frame::Hello(decode_hello(&mut r)?),
        tag::ERROR => Frame::Error(decode_error_code(&mut r)?),
        tag::GET_RANGE => Frame::GetRange(GetRange {
            blob: r.blob()?,
            offset: r.u64("offset")?,
            len: r.u64("len")?,
        }),
        tag::RANGE_HEADER => Frame::RangeHeader(decode_range_header(&mut r)?),
        tag::HAVE => Frame::Have { blob: r.blob()? },
        tag::HAVE_REPLY => Frame::HaveReply(decode_have_reply(&mut r)?),
        tag => return Err(WireError::UnknownTag { tag }),
    };
    r.finish(frame.name())?;
    Ok(frame)
}

/// Splits one whole frame off the front of `buf`: `Ok(None)` if `buf` does
/// not yet hold all of it, else the frame and the bytes it took.
pub fn try_decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
    let Some(header) = buf.first_chunk::<FRAME_HEADER_LEN>() else {
        return Ok(None);
    };
    let len = frame_len(*header)?;
    let Some(body) = buf.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
        return Ok(None);
    };
    Ok(Some((decode(body)?, FRAME_HEADER_LEN + len)))
}

impl Frame {
    /// The message name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Error(_) => "Error",
            Frame::GetRange(_) => "GetRange",
            Frame::RangeHeader(_) => "RangeHeader",
            Frame::Have { .. } => "Have",
            Frame::HaveReply(_) => "HaveReply",
        }
    }
}

impl PieceMap {
    /// Number of pieces of a blob of `size` bytes in `piece_size` pieces.
    pub fn piece_count(size: u64, piece_size: u64) -> u64 {
        if piece_size == 0 {
            return 0;
        }
        size.div_ceil(piece_size)
    }

    /// An empty map (no piece held).
    pub fn empty(size: u64, piece_size: u64, complete: bool) -> Self {
        let bytes = Self::piece_count(size, piece_size).div_ceil(8);
        Self {
            size,
            piece_size,
            complete,
            bitmap: vec![0; usize::try_from(bytes).unwrap_or(0)],
        }
    }

    pub fn pieces(&self) -> u64 {
        Self::piece_count(self.size, self.piece_size)
    }

    pub fn has(&self, piece: u64) -> bool {
        let Ok(byte) = usize::try_from(piece / 8) else {
            return false;
        };
        piece < self.pieces()
            && self
                .bitmap
                .get(byte)
                .is_some_and(|b| b & (0x80 >> (piece % 8)) != 0)
    }

    pub fn set(&mut self, piece: u64) {
        if piece >= self.pieces() {
            return;
        }
        let Ok(byte) = usize::try_from(piece / 8) else {
            return;
        };
        if let Some(b) = self.bitmap.get_mut(byte) {
            *b |= 0x80 >> (piece % 8);
        }
    }
}

impl ErrorCode {
    fn code(self) -> u16 {
        match self {
            ErrorCode::Internal => 1,
            ErrorCode::BadRequest => 2,
            ErrorCode::Corrupt => 3,
            ErrorCode::OutOfRange { .. } => 4,
            ErrorCode::IncompatibleVersion { .. } => 5,
            ErrorCode::JoinRefused => 6,
            ErrorCode::Unknown(code) => code,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Internal => f.write_str("internal error"),
            ErrorCode::BadRequest => f.write_str("bad request"),
            ErrorCode::Corrupt => f.write_str("holder's copy is corrupt"),
            ErrorCode::OutOfRange { size } => write!(f, "range outside the blob's {size} bytes"),
            ErrorCode::IncompatibleVersion { ours, theirs } => {
                write!(
                    f,
                    "incompatible protocol version: {ours} here, {theirs} there"
                )
            }
            ErrorCode::JoinRefused => f.write_str("join secret not proven"),
            ErrorCode::Unknown(code) => write!(f, "unknown error code {code}"),
        }
    }
}

impl CloseCode {
    pub fn to_u32(self) -> u32 {
        match self {
            CloseCode::Normal => 0,
            CloseCode::JoinRefused => 1,
            CloseCode::IncompatibleVersion => 2,
            CloseCode::Protocol => 3,
            CloseCode::HandshakeTimeout => 4,
            CloseCode::Unknown(code) => code,
        }
    }

    pub fn from_u64(code: u64) -> Self {
        match code {
            0 => CloseCode::Normal,
            1 => CloseCode::JoinRefused,
            2 => CloseCode::IncompatibleVersion,
            3 => CloseCode::Protocol,
            4 => CloseCode::HandshakeTimeout,
            other => CloseCode::Unknown(u32::try_from(other).unwrap_or(u32::MAX)),
        }
    }
}

impl ResetCode {
    pub fn to_u32(self) -> u32 {
        match self {
            ResetCode::Corrupt => 1,
            ResetCode::Internal => 2,
            ResetCode::Shutdown => 3,
            ResetCode::Cancelled => 4,
            ResetCode::Unknown(code) => code,
        }
    }

    pub fn from_u64(code: u64) -> Self {
        match code {
            1 => ResetCode::Corrupt,
            2 => ResetCode::Internal,
            3 => ResetCode::Shutdown,
            4 => ResetCode::Cancelled,
            other => ResetCode::Unknown(u32::try_from(other).unwrap_or(u32::MAX)),
        }
    }
}

mod tag {
    pub const HELLO: u8 = 1;
    pub const ERROR: u8 = 2;
    pub const GET_RANGE: u8 = 3;
    pub const RANGE_HEADER: u8 = 4;
    pub const HAVE: u8 = 5;
    pub const HAVE_REPLY: u8 = 6;
}

mod status {
    pub const OK: u8 = 0;
    pub const NOT_PRESENT: u8 = 1;
    pub const BUSY: u8 = 2;
    pub const NOT_FOUND: u8 = 3;
    pub const ERROR: u8 = 4;
}

fn encode_body(frame: &Frame, out: &mut Vec<u8>) -> Result<(), WireError> {
    match frame {
        Frame::Hello(h) => {
            out.push(tag::HELLO);
            out.extend_from_slice(&h.version.to_be_bytes());
            out.extend_from_slice(h.node.as_bytes());
            out.extend_from_slice(&h.proof);
        }
        Frame::Error(code) => {
            out.push(tag::ERROR);
            encode_error_code(*code, out);
        }
        Frame::GetRange(g) => {
            out.push(tag::GET_RANGE);
            put_blob(&g.blob, out);
            out.extend_from_slice(&g.offset.to_be_bytes());
            out.extend_from_slice(&g.len.to_be_bytes());
        }
        Frame::RangeHeader(h) => {
            out.push(tag::RANGE_HEADER);
            encode_range_header(h, out)?;
        }
        Frame::Have { blob } => {
            out.push(tag::HAVE);
            put_blob(blob, out);
        }
        Frame::HaveReply(None) => {
            out.push(tag::HAVE_REPLY);
            out.push(0);
        }
        Frame::HaveReply(Some(map)) => {
            out.push(tag::HAVE_REPLY);
            out.push(1);
            out.extend_from_slice(&map.size.to_be_bytes());
            out.extend_from_slice(&map.piece_size.to_be_bytes());
            out.push(u8::from(map.complete));
            let len = u32::try_from(map.bitmap.len()).map_err(|_| WireError::TooLarge {
                len: map.bitmap.len(),
                max: MAX_FRAME_LEN,
            })?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&map.bitmap);
        }
    }
    Ok(())
}

fn encode_range_header(h: &RangeHeader, out: &mut Vec<u8>) -> Result<(), WireError> {
    out.extend_from_slice(&h.len.to_be_bytes());
    match &h.status {
        RangeStatus::Ok => out.push(status::OK),
        RangeStatus::NotPresent { size, available } => {
            if available.len() > MAX_AVAILABLE_RANGES {
                return Err(WireError::Invalid {
                    what: "available ranges (too many)",
                });
            }
            out.push(status::NOT_PRESENT);
            out.extend_from_slice(&size.to_be_bytes());
            out.extend_from_slice(&(available.len() as u16).to_be_bytes());
            for (start, end) in available {
                out.extend_from_slice(&start.to_be_bytes());
                out.extend_from_slice(&end.to_be_bytes());
            }
        }
        RangeStatus::Busy => out.push(status::BUSY),
        RangeStatus::NotFound => out.push(status::NOT_FOUND),
        RangeStatus::Error(code) => {
            out.push(status::ERROR);
            encode_error_code(*code, out);
        }
    }
    Ok(())
}

fn encode_error_code(code: ErrorCode, out: &mut Vec<u8>) {
    out.extend_from_slice(&code.code().to_be_bytes());
    match code {
        ErrorCode::OutOfRange { size } => out.extend_from_slice(&size.to_be_bytes()),
        ErrorCode::IncompatibleVersion { ours, theirs } => {
            out.extend_from_slice(&ours.to_be_bytes());
            out.extend_from_slice(&theirs.to_be_bytes());
        }
        _ => {}
    }
}

fn put_blob(blob: &BlobId, out: &mut Vec<u8>) {
    out.push(match blob.algorithm() {
        DigestAlgorithm::Sha256 => 1,
        DigestAlgorithm::Sha512 => 2,
    });
    out.extend_from_slice(blob.bytes());
}

fn decode_hello(r: &mut Reader<'_>) -> Result<Hello, WireError> {
    let version = r.u16("version")?;
    if version != PROTOCOL_VERSION {
        return Err(WireError::IncompatibleVersion {
            ours: PROTOCOL_VERSION,
            theirs: version,
        });
    }
    Ok(Hello {
        version,
        node: NodeId::from_bytes(r.array::<NODE_ID_LEN>("node id")?),
        proof: r.array::<JOIN_PROOF_LEN>("join proof")?,
    })
}

fn decode_error_code(r: &mut Reader<'_>) -> Result<ErrorCode, WireError> {
    Ok(match r.u16("error code")? {
        1 => ErrorCode::Internal,
        2 => ErrorCode::BadRequest,
        3 => ErrorCode::Corrupt,
        4 => ErrorCode::OutOfRange {
            size: r.u64("size")?,
        },
        5 => ErrorCode::IncompatibleVersion {
            ours: r.u16("version")?,
            theirs: r.u16("version")?,
        },
        6 => ErrorCode::JoinRefused,
        other => {
            r.skip_rest();
            ErrorCode::Unknown(other)
        }
    })
}

fn decode_range_header(r: &mut Reader<'_>) -> Result<RangeHeader, WireError> {
    let len = r.u64("len")?;
    let status = match r.u8("status")? {
        status::OK => RangeStatus::Ok,
        status::NOT_PRESENT => {
            let size = r.u64("size")?;
            let available = decode_ranges(r)?;
            RangeStatus::NotPresent { size, available }
        }
        status::BUSY => RangeStatus::Busy,
        status::NOT_FOUND => RangeStatus::NotFound,
        status::ERROR => RangeStatus::Error(decode_error_code(r)?),
        _ => return Err(WireError::Invalid { what: "status" }),
    };
    if status != RangeStatus::Ok && len != 0 {
        return Err(WireError::Invalid {
            what: "len (must be 0 unless Ok)",
        });
    }
    Ok(RangeHeader { status, len })
}

fn decode_ranges(r: &mut Reader<'_>) -> Result<Vec<(u64, u64)>, WireError> {
    let count = usize::from(r.u16("range count")?);
    if count > MAX_AVAILABLE_RANGES {
        return Err(WireError::Invalid {
            what: "range count",
        });
    }
    if r.remaining() < count * 16 {
        return Err(WireError::Truncated { what: "ranges" });
    }
    let mut ranges = Vec::with_capacity(count);
    let mut prev_end = 0u64;
    for i in 0..count {
        let (start, end) = (r.u64("range start")?, r.u64("range end")?);
        if start >= end || (i > 0 && start <= prev_end) {
            return Err(WireError::Invalid {
                what: "ranges (must be non-empty, sorted, disjoint)",
            });
        }
        prev_end = end;
        ranges.push((start, end));
    }
    Ok(ranges)
}

fn decode_have_reply(r: &mut Reader<'_>) -> Result<Option<PieceMap>, WireError> {
    match r.u8("have flag")? {
        0 => return Ok(None),
        1 => {}
        _ => return Err(WireError::Invalid { what: "have flag" }),
    }
    let size = r.u64("size")?;
    let piece_size = r.u64("piece size")?;
    let complete = match r.u8("complete")? {
        0 => false,
        1 => true,
        _ => return Err(WireError::Invalid { what: "complete" }),
    };
    let len = r.u32("bitmap length")? as usize;
    if piece_size == 0 || PieceMap::piece_count(size, piece_size).div_ceil(8) != len as u64 {
        return Err(WireError::Invalid {
            what: "piece map (bitmap length must match size / piece size)",
        });
    }
    let bitmap = r.bytes(len, "bitmap")?.to_vec();
    Ok(Some(PieceMap {
        size,
        piece_size,
        complete,
        bitmap,
    }))
}

/// A cursor over a frame body; every read checks the remaining length.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated { what });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn blob(&mut self) -> Result<BlobId, WireError> {
        let algorithm = match self.u8("digest algorithm")? {
            1 => DigestAlgorithm::Sha256,
            2 => DigestAlgorithm::Sha512,
            _ => {
                return Err(WireError::Invalid {
                    what: "digest algorithm",
                })
            }
        };
        let raw = self.bytes(algorithm.output_len(), "digest")?;
        Digest::from_raw(algorithm, raw).ok_or(WireError::Invalid { what: "digest" })
    }

    fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn skip_rest(&mut self) {
        self.buf = &[];
    }

    fn finish(self, what: &'static str) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes {
                what,
                extra: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn blob_strategy() -> impl Strategy<Value = BlobId> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 32)
                .prop_filter_map("sha256", |b| Digest::from_raw(DigestAlgorithm::Sha256, &b)),
            proptest::collection::vec(any::<u8>(), 64)
                .prop_filter_map("sha512", |b| Digest::from_raw(DigestAlgorithm::Sha512, &b)),
        ]
    }

    fn error_code_strategy() -> impl Strategy<Value = ErrorCode> {
        prop_oneof![
            Just(ErrorCode::Internal),
            Just(ErrorCode::BadRequest),
            Just(ErrorCode::Corrupt),
            any::<u64>().prop_map(|size| ErrorCode::OutOfRange { size }),
            (any::<u16>(), any::<u16>())
                .prop_map(|(ours, theirs)| ErrorCode::IncompatibleVersion { ours, theirs }),
            Just(ErrorCode::JoinRefused),
            (7u16..).prop_map(ErrorCode::Unknown),
        ]
    }

    fn ranges_strategy() -> impl Strategy<Value = Vec<(u64, u64)>> {
        proptest::collection::vec((1u64..1000, 1u64..1000), 0..MAX_AVAILABLE_RANGES).prop_map(
            |steps| {
                let mut pos = 0u64;
                steps
                    .into_iter()
                    .map(|(gap, len)| {
                        let start = pos + gap;
                        pos = start + len;
                        (start, pos)
                    })
                    .collect()
            },
        )
    }

    fn status_strategy() -> impl Strategy<Value = RangeStatus> {
        prop_oneof![
            Just(RangeStatus::Ok),
            (any::<u64>(), ranges_strategy())
                .prop_map(|(size, available)| RangeStatus::NotPresent { size, available }),
            Just(RangeStatus::Busy),
            Just(RangeStatus::NotFound),
            error_code_strategy().prop_map(RangeStatus::Error),
        ]
    }

    fn piece_map_strategy() -> impl Strategy<Value = PieceMap> {
        (0u64..1 << 40, 1u64..1 << 30, any::<bool>(), any::<u64>()).prop_map(
            |(size, piece_size, complete, seed)| {
                let piece_size = piece_size.max(size / 4096 + 1);
                let mut map = PieceMap::empty(size, piece_size, complete);
                for p in 0..map.pieces() {
                    if (seed >> (p % 64)) & 1 == 1 {
                        map.set(p);
                    }
                }
                map
            },
        )
    }

    fn frame_strategy() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (
                proptest::array::uniform32(any::<u8>()),
                proptest::array::uniform32(any::<u8>())
            )
                .prop_map(|(node, proof)| Frame::Hello(Hello {
                    version: PROTOCOL_VERSION,
                    node: NodeId::from_bytes(node),
                    proof,
                })),
            error_code_strategy().prop_map(Frame::Error),
            (blob_strategy(), any::<u64>(), any::<u64>())
                .prop_map(|(blob, offset, len)| Frame::GetRange(GetRange { blob, offset, len })),
            (status_strategy(), any::<u64>()).prop_map(|(status, len)| {
                let len = if status == RangeStatus::Ok { len } else { 0 };
                Frame::RangeHeader(RangeHeader { status, len })
            }),
            blob_strategy().prop_map(|blob| Frame::Have { blob }),
            proptest::option::of(piece_map_strategy()).prop_map(Frame::HaveReply),
        ]
    }

    proptest! {
        #[test]
        fn round_trips(frame in frame_strategy()) {
            let bytes = to_bytes(&frame).expect("encodes");
            prop_assert!(bytes.len() <= FRAME_HEADER_LEN + MAX_FRAME_LEN);
            let (decoded, used) = try_decode(&bytes).expect("decodes").expect("whole");
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(decoded, frame);
            // Every strict prefix is incomplete or an error, never a frame.
            for cut in 0..bytes.len() {
                if let Ok(Some(_)) = try_decode(&bytes[..cut]) {
                    prop_assert!(false, "prefix of {} bytes decoded", cut);
                }
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
            let _ = try_decode(&bytes);
        }

        #[test]
        fn mutated_frames_never_panic(
            frame in frame_strategy(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = to_bytes(&frame).expect("encodes");
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if let Ok(Some((frame, _))) = try_decode(&bytes) {
                // Whatever decodes re-encodes (it is well formed).
                prop_assert!(to_bytes(&frame).is_ok());
            }
        }
    }

    #[test]
    fn oversized_length_is_rejected_before_reading() {
        let header = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        assert!(matches!(frame_len(header), Err(WireError::TooLarge { .. })));
        assert!(matches!(
            try_decode(&u32::MAX.to_be_bytes()),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn other_versions_are_refused_by_their_version_alone() {
        // A future Hello may have any layout after its version.
        let body = [tag::HELLO, 0, 2, 0xff];
        assert_eq!(
            decode(&body),
            Err(WireError::IncompatibleVersion {
                ours: PROTOCOL_VERSION,
                theirs: 2
            })
        );
    }

    #[test]
    fn frozen_layouts() {
        let hello = to_bytes(&Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            node: NodeId::from_bytes([7; 32]),
            proof: [9; 32],
        }))
        .expect("encodes");
        assert_eq!(&hello[..7], &[0, 0, 0, 67, 1, 0, 1]);
        let err = to_bytes(&Frame::Error(ErrorCode::IncompatibleVersion {
            ours: 1,
            theirs: 2,
        }))
        .expect("encodes");
        assert_eq!(err, [0, 0, 0, 7, 2, 0, 5, 0, 1, 0, 2]);
    }

    #[test]
    fn unknown_error_codes_skip_their_fields() {
        let body = [tag::ERROR, 0, 99, 1, 2, 3];
        assert_eq!(decode(&body), Ok(Frame::Error(ErrorCode::Unknown(99))));
    }

    #[test]
    fn bad_values_are_errors() {
        // len must be 0 for a non-Ok status.
        let mut body = vec![tag::RANGE_HEADER];
        body.extend_from_slice(&5u64.to_be_bytes());
        body.push(status::BUSY);
        assert!(decode(&body).is_err());
        // overlapping ranges
        let mut body = vec![tag::RANGE_HEADER];
        body.extend_from_slice(&0u64.to_be_bytes());
        body.push(status::NOT_PRESENT);
        body.extend_from_slice(&100u64.to_be_bytes());
        body.extend_from_slice(&2u16.to_be_bytes());
        for v in [0u64, 10, 5, 20] {
            body.extend_from_slice(&v.to_be_bytes());
        }
        assert!(decode(&body).is_err());
        // trailing bytes
        let mut frame = to_bytes(&Frame::Error(ErrorCode::Internal)).expect("encodes");
        frame.push(0);
        frame[3] += 1;
        assert!(matches!(
            try_decode(&frame),
            Err(WireError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn piece_map_bits() {
        let mut map = PieceMap::empty(10 * 1024, 1024, false);
        assert_eq!(map.bitmap.len(), 2);
        map.set(0);
        map.set(9);
        map.set(10);
        assert!(map.has(0) && map.has(9) && !map.has(1) && !map.has(10));
        assert_eq!(map.bitmap, vec![0x80, 0x40]);
    }
}
