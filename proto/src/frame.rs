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

    /// A packet carrying `n` bytes of a pattern that differs for each packet.
    fn record_packet(id: u32, n: usize) -> Packet {
        let data = (0..n).map(|i| (i as u64).wrapping_mul(31).wrapping_add(u64::from(id)) as u8).collect();
        let body = Body::AnswerObject(crate::msg::AnswerObject { oid: u64::from(id), data, ..Default::default() });
        Packet { id, answer: true, body: Some(body) }
    }

    /// The byte stream of a random sequence of packets of every size up to `max` (most small,
    /// some around powers of two, a few of the maximum), and the packets.
    fn random_stream(rng: &mut fastrand::Rng, count: u32, max: usize) -> (Vec<u8>, Vec<Packet>) {
        let mut packets = Vec::new();
        let mut buf = BytesMut::new();
        for id in 0..count {
            let n = match rng.u8(0..5) {
                0 | 1 => rng.usize(0..300),
                2 => rng.usize(0..70_000),
                3 => ((1usize << rng.u32(8..=max.ilog2())) + rng.usize(0..3)).saturating_sub(1).min(max),
                _ => max,
            };
            let p = if n == 0 && rng.bool() { packet() } else { record_packet(id, n) };
            encode(&p, &mut buf);
            packets.push(p);
        }
        (buf.to_vec(), packets)
    }

    /// The reading buffer is reused from frame to frame: whatever the sizes of the frames
    /// and the pieces the bytes arrive in, each frame comes out whole and alone (`parse`, as
    /// `FrameReader` and `BlockingConn` call it).
    #[test]
    fn random_sequences_of_frames_in_random_pieces() {
        for seed in 0..8 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let (stream, packets) = random_stream(&mut rng, 60, 2 << 20);
            let max = (2 << 20) + 64;
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut rest = &stream[..];
            while !rest.is_empty() {
                let k = match rng.u8(0..3) {
                    0 => rng.usize(1..=16),
                    1 => rng.usize(1..=20_000),
                    _ => rng.usize(1..=1 << 21),
                }
                .min(rest.len());
                buf.extend_from_slice(&rest[..k]);
                rest = &rest[k..];
                while let Some(p) = parse(&mut buf, max).unwrap() {
                    got.push(p);
                }
            }
            assert!(buf.is_empty(), "seed {seed}: bytes left over");
            assert!(got == packets, "seed {seed}: frames differ");
        }
    }

    /// An `AsyncRead` that hands out its bytes in random pieces.
    struct Pieces {
        data: Vec<u8>,
        pos: usize,
        rng: fastrand::Rng,
    }

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            out: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let left = self.data.len() - self.pos;
            let k = self.rng.usize(1..=100_000).min(left).min(out.remaining());
            let pos = self.pos;
            out.put_slice(&self.data[pos..pos + k]);
            self.pos += k;
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn frame_reader_reads_random_sequences_whole() {
        for seed in 0..4 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let (mut data, packets) = random_stream(&mut rng, 40, 1 << 20);
            data.splice(0..0, MAGIC.iter().copied());
            let mut r = FrameReader::new(Pieces { data, pos: 0, rng: rng.fork() }, (1 << 20) + 64);
            r.read_magic().await.unwrap();
            for (i, p) in packets.iter().enumerate() {
                assert!(r.read_packet().await.unwrap().as_ref() == Some(p), "seed {seed}: frame {i} differs");
            }
            assert_eq!(r.read_packet().await.unwrap(), None);
        }
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
