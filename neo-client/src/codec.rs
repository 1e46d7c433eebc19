//! How records are encoded: zlib compression of what the client stores (when it makes a record
//! smaller) and its inverse for what it loads, with one (de)compression state per thread.
//!
//! A (de)compression state carries what one stream left in it, so reusing it is a hazard:
//! a deflate state whose `Finish` ran out of output room once produced invalid streams for the
//! records compressed after it, and those were acknowledged as committed (issue 18). So:
//! - a state goes back to its thread for reuse only after a call that ended its stream
//!   cleanly; any other outcome (no room, an error, a panic) drops it and the next record gets
//!   a fresh one;
//! - compression is given room for the whole stream (`deflate_bound`), so that it always ends
//!   its stream, whatever the data;
//! - every compressed record is inflated again and compared with the application's bytes
//!   before it is used (inflating costs a fraction of deflating, see `neo-bench`): a record is
//!   stored compressed only if that gives its bytes back, otherwise as it is.

use crate::{ClientError, Result};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use neo_lib::Oid;
use std::cell::RefCell;
use tracing::error;

/// `compression` of a record stored as it is.
pub const RAW: u32 = 0;
/// `compression` of a zlib stream.
pub const ZLIB: u32 = 1;
/// Records up to this size are not worth compressing.
const MIN_COMPRESS: usize = 128;
/// Largest record a load may inflate to (the largest one a client can store).
const MAX_INFLATED: usize = neo_lib::MAX_RECORD_SIZE;

thread_local! {
    // A deflate state is large (hundreds of KiB) and an inflate state tens of KiB: built once
    // per thread, kept only while every use ends cleanly (`with_state`).
    static DEFLATE: RefCell<Option<Compress>> = const { RefCell::new(None) };
    static INFLATE: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// Run `f` with this thread's state (a new one if there is none, or if it is in use by a
/// caller up the stack); the state is kept for the next call only if `f` says it ended
/// cleanly (the second member of its result).
fn with_state<S, R>(
    slot: &'static std::thread::LocalKey<RefCell<Option<S>>>,
    new: impl FnOnce() -> S,
    f: impl FnOnce(&mut S) -> (R, bool),
) -> R {
    let taken = slot.with(|s| s.try_borrow_mut().ok().and_then(|mut s| s.take()));
    let mut state = taken.unwrap_or_else(new);
    let (result, clean) = f(&mut state);
    if clean {
        slot.with(|s| {
            if let Ok(mut s) = s.try_borrow_mut() {
                *s = Some(state);
            }
        });
    }
    result
}

/// Room for a whole zlib stream of `len` bytes, incompressible ones included: zlib-rs's
/// fastest level codes random bytes with fixed Huffman codes, 5.5% larger (measured: 3,317,713
/// bytes for 3 MiB), more than zlib's `compressBound`.
fn deflate_bound(len: usize) -> usize {
    len + (len >> 3) + 64
}

/// (compression, bytes to store): a zlib stream when compression is enabled and makes the
/// record smaller, the record as it is otherwise.
pub fn compress(data: &[u8], enabled: bool) -> (u32, Vec<u8>) {
    if enabled
        && data.len() > MIN_COMPRESS
        && let Some(z) = deflate(data)
        && z.len() < data.len()
    {
        if inflates_to(&z, data) {
            return (ZLIB, z);
        }
        // Never seen: it would be a defect of the compressor. The record is still safe.
        error!("zlib stream of a {}-byte record does not inflate back to it: stored uncompressed", data.len());
    }
    (RAW, data.to_vec())
}

/// One whole zlib stream of `data`, or None if the compressor did not end it.
pub fn deflate(data: &[u8]) -> Option<Vec<u8>> {
    with_state(
        &DEFLATE,
        || Compress::new(Compression::fast(), true),
        |d| {
            d.reset();
            let mut out = Vec::with_capacity(deflate_bound(data.len()));
            let ended = matches!(d.compress_vec(data, &mut out, FlushCompress::Finish), Ok(Status::StreamEnd))
                && d.total_in() == data.len() as u64;
            (ended.then_some(out), ended)
        },
    )
}

/// Does the zlib stream `z` inflate to exactly `data`? (Into a small buffer, piece by piece:
/// no allocation of the record's size.)
pub fn inflates_to(z: &[u8], data: &[u8]) -> bool {
    with_state(
        &INFLATE,
        || Decompress::new(true),
        |d| {
            d.reset(true);
            // Room for one byte more than the record, up to 32 KiB a piece.
            let mut buf = vec![0u8; (data.len() + 1).clamp(64, 32 * 1024)];
            let mut expected = data;
            loop {
                let (in_before, out_before) = (d.total_in(), d.total_out());
                let rest = usize::try_from(in_before).ok().and_then(|n| z.get(n..)).unwrap_or_default();
                let status = match d.decompress(rest, &mut buf, FlushDecompress::None) {
                    Ok(s) => s,
                    Err(_) => return (false, false),
                };
                let produced = (d.total_out() - out_before) as usize;
                let Some((head, tail)) = expected.split_at_checked(produced) else { return (false, false) };
                if buf[..produced] != *head {
                    return (false, false);
                }
                expected = tail;
                if status == Status::StreamEnd {
                    let whole = expected.is_empty() && d.total_in() == z.len() as u64;
                    return (whole, true);
                }
                if produced == 0 && d.total_in() == in_before {
                    return (false, false); // no progress: a cut stream
                }
            }
        },
    )
}

/// The application's bytes of a loaded record.
pub fn decompress(oid: Oid, compression: u32, data: Vec<u8>) -> Result<Vec<u8>> {
    match compression {
        RAW => Ok(data),
        ZLIB => with_state(
            &INFLATE,
            || Decompress::new(true),
            |d| {
                let r = inflate(d, &data);
                let clean = r.is_ok();
                (r, clean)
            },
        )
        .map_err(|msg| ClientError::Corrupt { oid, msg: format!("cannot decompress: {msg}") }),
        c => Err(ClientError::Corrupt { oid, msg: format!("unknown compression {c}") }),
    }
}

/// One whole zlib stream from `data` (nothing after it), growing the output as needed up to
/// `MAX_INFLATED`.
fn inflate(d: &mut Decompress, data: &[u8]) -> std::result::Result<Vec<u8>, String> {
    d.reset(true);
    let mut out = Vec::with_capacity(data.len().saturating_mul(4).clamp(256, MAX_INFLATED));
    loop {
        let (used_in, had_out) = (d.total_in(), d.total_out());
        let rest = usize::try_from(used_in).ok().and_then(|n| data.get(n..)).unwrap_or_default();
        let status = d.decompress_vec(rest, &mut out, FlushDecompress::None).map_err(|e| e.to_string())?;
        // The output has room for one byte more than the largest record, to tell a bomb from it.
        if out.len() > MAX_INFLATED {
            return Err(format!("inflates to more than {MAX_INFLATED} bytes"));
        }
        if status == Status::StreamEnd {
            if d.total_in() != data.len() as u64 {
                return Err(format!("{} bytes after the end of the zlib stream", data.len() as u64 - d.total_in()));
            }
            return Ok(out);
        }
        if out.len() == out.capacity() {
            out.reserve_exact(out.capacity().max(256).min(MAX_INFLATED + 1 - out.len()));
        } else if d.total_in() == used_in && d.total_out() == had_out {
            // Room left and nothing consumed: the stream is cut short.
            return Err("truncated zlib stream".into());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut v = vec![0u8; n];
        rng.fill(&mut v);
        v
    }

    /// A record of `n` bytes of one of the shapes applications store.
    fn record(rng: &mut fastrand::Rng, n: usize) -> Vec<u8> {
        match rng.u8(0..5) {
            0 => noise(n, rng.u64(..)),
            1 => vec![0; n],
            2 => b"ab".iter().cycle().take(n).copied().collect(),
            3 => {
                // Text-like: words from a small vocabulary.
                let words: [&[u8]; 6] = [b"persistent ", b"mapping ", b"(dp0\n", b"S'title'\n", b"\x80\x03", b"zodb "];
                let mut v = Vec::with_capacity(n + 16);
                while v.len() < n {
                    v.extend_from_slice(words[rng.usize(..words.len())]);
                }
                v.truncate(n);
                v
            }
            _ => {
                // Mixed: compressible stretches between random ones.
                let mut v = Vec::with_capacity(n);
                while v.len() < n {
                    let k = rng.usize(1..=4096).min(n - v.len());
                    if rng.bool() {
                        v.extend(noise(k, rng.u64(..)))
                    } else {
                        v.extend(std::iter::repeat_n(rng.u8(..), k))
                    }
                }
                v
            }
        }
    }

    /// A size from 0 to `max`, most of them small, some around powers of two and the bounds.
    fn size(rng: &mut fastrand::Rng, max: usize) -> usize {
        match rng.u8(0..4) {
            0 => rng.usize(0..=300),
            1 => rng.usize(0..=64 * 1024),
            2 => {
                let p = 1usize << rng.u32(7..=max.ilog2());
                (p + rng.usize(0..=2) - 1).min(max)
            }
            _ => rng.usize(0..=max),
        }
    }

    /// The defect of issue 18, as found: a record that does not fit compressed (3 MiB of noise),
    /// then one that does.
    #[test]
    fn a_record_after_an_incompressible_one_gives_its_bytes_back() {
        let big = noise(3 << 20, 7);
        assert!(compress(&big, true) == (RAW, big.clone()));
        let small = b"ab".repeat(4096);
        let (c, z) = compress(&small, true);
        assert_eq!(c, ZLIB);
        assert!(decompress(Oid(2), c, z).unwrap() == small);
    }

    /// Random sequences of records of every shape and size through one thread's states,
    /// compression on and off, each read back: the reused states never leak from one record
    /// to the next. Loads of corrupt records are mixed in (they fail, and leave nothing behind).
    #[test]
    fn random_sequences_of_records_give_their_bytes_back() {
        for seed in 0..6 {
            let mut rng = fastrand::Rng::with_seed(seed);
            for _ in 0..60 {
                let n = size(&mut rng, 4 << 20);
                let data = record(&mut rng, n);
                let enabled = rng.u8(0..4) != 0;
                let (c, stored) = compress(&data, enabled);
                if !enabled || data.len() <= MIN_COMPRESS {
                    assert_eq!(c, RAW);
                }
                if c == ZLIB {
                    assert!(stored.len() < data.len());
                }
                if rng.u8(0..4) == 0 && c == ZLIB && stored.len() > 2 {
                    // A corrupt record in between: cut or extended, it is an error; with a bit
                    // flipped, it may still inflate (the checksum is the storage's and the
                    // client's check); either way the state is left clean for the next one.
                    let mut bad = stored.clone();
                    match rng.u8(0..3) {
                        0 => {
                            bad.truncate(rng.usize(0..bad.len()));
                            assert!(decompress(Oid(3), c, bad).is_err(), "seed {seed}: a cut stream");
                        }
                        1 => {
                            bad.push(rng.u8(..));
                            assert!(decompress(Oid(3), c, bad).is_err(), "seed {seed}: bytes after the stream");
                        }
                        _ => {
                            let i = rng.usize(0..bad.len());
                            bad[i] ^= 1 << rng.u32(0..8);
                            let _ = decompress(Oid(3), c, bad);
                        }
                    }
                }
                assert!(decompress(Oid(1), c, stored).unwrap() == data, "seed {seed}: {} bytes differ", data.len());
            }
        }
    }

    #[test]
    fn largest_records_round_trip() {
        for data in [noise(neo_lib::MAX_RECORD_SIZE, 1), vec![0; neo_lib::MAX_RECORD_SIZE]] {
            let (c, z) = compress(&data, true);
            assert!(decompress(Oid(1), c, z).unwrap() == data);
        }
    }

    /// Compression ends its stream whatever the data (its state is kept for the next record).
    #[test]
    fn deflate_always_ends_its_stream() {
        for n in [129, 1000, 4096, 65_536, 1 << 20, 3 << 20] {
            for data in [noise(n, n as u64), vec![7; n]] {
                let z = deflate(&data).unwrap();
                assert!(z.len() <= deflate_bound(n));
            }
        }
    }

    #[test]
    fn compression_only_when_smaller() {
        let text = b"hello world ".repeat(100);
        let (c, z) = compress(&text, true);
        assert!(c == ZLIB && z.len() < text.len());
        assert_eq!(compress(&noise(1000, 3), true), (RAW, noise(1000, 3)));
        assert_eq!(compress(&text, false).0, RAW);
        assert_eq!(compress(b"short", true), (RAW, b"short".to_vec()));
    }

    #[test]
    fn bad_streams_are_errors() {
        let text = b"hello world ".repeat(100);
        let (_, z) = compress(&text, true);
        assert!(decompress(Oid(1), ZLIB, b"not zlib".to_vec()).is_err());
        assert!(decompress(Oid(1), 9, vec![]).is_err());
        assert!(decompress(Oid(1), ZLIB, z[..z.len() / 2].to_vec()).is_err(), "a cut stream");
        let mut longer = z.clone();
        longer.extend_from_slice(b"tail");
        assert!(decompress(Oid(1), ZLIB, longer).is_err(), "bytes after the stream");
        // A bomb: more than any record can be.
        let mut d = Compress::new(Compression::best(), true);
        let mut bomb = Vec::with_capacity(1 << 20);
        let zeros = vec![0u8; MAX_INFLATED + 1];
        assert_eq!(d.compress_vec(&zeros, &mut bomb, FlushCompress::Finish).unwrap(), Status::StreamEnd);
        let e = match decompress(Oid(1), ZLIB, bomb) {
            Err(e) => e.to_string(),
            Ok(d) => panic!("a bomb inflated to {} bytes", d.len()),
        };
        assert!(e.contains("more than"), "{e}");
        // The state is fine afterwards.
        assert_eq!(decompress(Oid(1), ZLIB, z).unwrap(), text);
    }
}
