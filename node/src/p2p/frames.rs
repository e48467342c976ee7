//! Reading and writing `shoal_proto::wire` frames on QUIC streams. The
//! length prefix is checked against the frame limit before the body is
//! allocated.

use quinn::{ReadExactError, RecvStream, SendStream, WriteError};
use shoal_proto::wire::{self, Frame, WireError, FRAME_HEADER_LEN};

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("reading a frame")]
    Read(#[source] quinn::ReadError),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("stream ended before a frame")]
    Finished,
    #[error("writing a frame")]
    Write(#[from] WriteError),
    #[error("malformed frame")]
    Wire(#[from] WireError),
}

/// Reads one frame. `Err(Finished)` if the stream ends cleanly before it.
pub async fn read_frame(recv: &mut RecvStream) -> Result<Frame, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Err(FrameError::Finished),
        Err(ReadExactError::FinishedEarly(_)) => return Err(FrameError::Truncated),
        Err(ReadExactError::ReadError(e)) => return Err(FrameError::Read(e)),
    }
    let len = wire::frame_len(header)?;
    let mut body = vec![0u8; len];
    match recv.read_exact(&mut body).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(_)) => return Err(FrameError::Truncated),
        Err(ReadExactError::ReadError(e)) => return Err(FrameError::Read(e)),
    }
    Ok(wire::decode(&body)?)
}

/// Writes one frame (does not finish the stream).
pub async fn write_frame(send: &mut SendStream, frame: &Frame) -> Result<(), FrameError> {
    let bytes = wire::to_bytes(frame)?;
    send.write_all(&bytes).await?;
    Ok(())
}
