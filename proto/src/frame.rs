//! Frames: after an 8-byte magic sent by each side, a stream of `[u32 big-endian length][Packet]`.
//! The length is checked against the maximum before any allocation or parsing.

use crate::msg::Packet;
use bytes::{Buf, BufMut, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Sent first by both ends of every connection. The last byte is the framing version.
pub const MAGIC: &[u8; 8] = b"NEO-RS\x00\x01";
/// Sent first by a client instead of `MAGIC` on a connection that only loads objects, one at a
/// time, waiting for each answer: a storage serves it from a thread of its own, with blocking
/// IO (see `blocking`). The server answers with `MAGIC`.
pub const READ_MAGIC: &[u8; 8] = b"NEO-RS\x01\x01";

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer does not speak the neo-rs protocol (bad magic {0:02x?})")]
    BadMagic(Vec<u8>),
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed packet: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("connection closed in the middle of a frame")]
    Truncated,
}

/// Append the frame of `packet` to `buf`.
pub fn encode(packet: &Packet, buf: &mut BytesMut) {
    let len = packet.encoded_len();
    buf.reserve(4 + len);
    buf.put_u32(len as u32);
    // Encoding into a BytesMut with reserved capacity cannot fail.
    let _ = packet.encode(buf);
}

/// Try to take one complete frame from `buf`.
pub fn parse(buf: &mut BytesMut, max: usize) -> Result<Option<Packet>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if buf.len() < 4 + len {
        // Grow step by step as bytes arrive: a 4-byte header alone must not make us allocate
        // the announced size.
        buf.reserve((4 + len - buf.len()).min(1 << 20));
        return Ok(None);
    }
    buf.advance(4);
    let frame = buf.split_to(len).freeze();
    Ok(Some(Packet::decode(frame)?))
}

/// Reading half of a connection.
pub struct FrameReader<R> {
    reader: R,
    buf: BytesMut,
    max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(reader: R, max: usize) -> Self {
        FrameReader { reader, buf: BytesMut::with_capacity(64 * 1024), max }
    }

    /// Read and check the peer's magic.
    pub async fn read_magic(&mut self) -> Result<(), FrameError> {
        let mut magic = [0u8; 8];
        let mut got = 0;
        while got < magic.len() {
            let n = self.reader.read(&mut magic[got..]).await?;
            if n == 0 {
                return Err(if got == 0 { FrameError::Truncated } else { FrameError::BadMagic(magic[..got].to_vec()) });
            }
            // Fail fast on the first wrong byte (random data, another protocol).
            if magic[got..got + n] != MAGIC[got..got + n] {
                return Err(FrameError::BadMagic(magic[..got + n].to_vec()));
            }
            got += n;
        }
        Ok(())
    }

    /// Next packet, `None` on a clean end of stream between frames.
    pub async fn read_packet(&mut self) -> Result<Option<Packet>, FrameError> {
        loop {
            if let Some(p) = parse(&mut self.buf, self.max)? {
                return Ok(Some(p));
            }
            if self.reader.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() { Ok(None) } else { Err(FrameError::Truncated) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{AskObject, packet::Body};

    fn packet() -> Packet {
        Packet { id: 7, answer: false, body: Some(Body::AskObject(AskObject { oid: 1, at: None, before: Some(2) })) }
    }

    #[test]
    fn roundtrip_and_partial() {
        let mut buf = BytesMut::new();
        encode(&packet(), &mut buf);
        let full = buf.clone();
        let mut part = BytesMut::from(&full[..full.len() - 1]);
        assert!(parse(&mut part, 1024).unwrap().is_none());
        part.extend_from_slice(&full[full.len() - 1..]);
        assert_eq!(parse(&mut part, 1024).unwrap(), Some(packet()));
        assert!(part.is_empty());
    }

    #[test]
    fn oversized_and_malformed() {
        let mut buf = BytesMut::new();
        buf.put_u32(1 << 30);
        assert!(matches!(parse(&mut buf, 1024), Err(FrameError::TooLarge { .. })));
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(parse(&mut buf, 1024), Err(FrameError::Decode(_))));
    }

    #[tokio::test]
    async fn bad_magic() {
        let data: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        let mut r = FrameReader::new(data, 1024);
        assert!(matches!(r.read_magic().await, Err(FrameError::BadMagic(_))));
        let mut ok = MAGIC.to_vec();
        let mut buf = BytesMut::new();
        encode(&packet(), &mut buf);
        ok.extend_from_slice(&buf);
        let mut r = FrameReader::new(&ok[..], 1024);
        r.read_magic().await.unwrap();
        assert_eq!(r.read_packet().await.unwrap(), Some(packet()));
        assert_eq!(r.read_packet().await.unwrap(), None);
    }
}
