//! Identifiers: transaction ids (ZODB TimeStamp format), object ids, node ids and ptids.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

/// A transaction id: 8 bytes, big-endian, in ZODB `TimeStamp` layout (high 32 bits = minutes since
/// 1900-01-01 UTC, low 32 bits = fraction of the minute in units of 60/2^32 s).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Tid(pub u64);

/// An object id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Oid(pub u64);

/// A partition table id: incremented by every change of the partition table.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug)]
pub struct Ptid(pub u64);

impl Tid {
    pub const ZERO: Tid = Tid(0);
    /// Largest usable TID (fits in a signed 64-bit SQL integer).
    pub const MAX: Tid = Tid(0x7fff_ffff_ffff_ffff);

    pub fn to_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    /// The smallest TID strictly greater than `self`.
    pub fn next(self) -> Tid {
        Tid(self.0.saturating_add(1))
    }

    /// TID for a UNIX time in seconds (UTC), as ZODB's `TimeStamp(*time.gmtime(t)[:5] + (sec,))`.
    pub fn from_unix(secs: f64) -> Tid {
        let secs = if secs.is_finite() && secs > 0.0 { secs } else { 0.0 };
        let whole = secs.floor() as i64;
        let days = whole.div_euclid(86_400);
        let rem = whole.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        let hour = rem / 3600;
        let minute = (rem % 3600) / 60;
        let sec = (rem % 60) as f64 + (secs - whole as f64);
        let high = ((((y - 1900) * 12 + m - 1) * 31 + d - 1) * 24 + hour) * 60 + minute;
        let high = high.clamp(0, 0x7fff_ffff) as u64;
        let low = ((sec / 60.0) * 4_294_967_296.0).floor().clamp(0.0, 4_294_967_295.0) as u64;
        Tid((high << 32) | low)
    }

    /// TID for the current time.
    pub fn now() -> Tid {
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        Tid::from_unix(secs)
    }

    /// UNIX time (UTC seconds) this TID stands for.
    pub fn to_unix(self) -> f64 {
        let high = (self.0 >> 32) as i64;
        let low = (self.0 & 0xffff_ffff) as f64;
        let minute = high % 60;
        let hour = (high / 60) % 24;
        let d = (high / (60 * 24)) % 31 + 1;
        let m = (high / (60 * 24 * 31)) % 12 + 1;
        let y = high / (60 * 24 * 31 * 12) + 1900;
        let days = days_from_civil(y, m, d);
        (days * 86_400 + hour * 3600 + minute * 60) as f64 + low * 60.0 / 4_294_967_296.0
    }

    /// Partition this TID belongs to in a table of `np` partitions.
    pub fn partition(self, np: u32) -> u32 {
        (self.0 % u64::from(np.max(1))) as u32
    }
}

impl Oid {
    pub const ZERO: Oid = Oid(0);
    pub fn to_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }
    pub fn partition(self, np: u32) -> u32 {
        (self.0 % u64::from(np.max(1))) as u32
    }
}

// Howard Hinnant's civil calendar algorithms (proleptic Gregorian, days since 1970-01-01).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl fmt::Display for Tid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}
impl fmt::Debug for Tid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tid:{:016x}", self.0)
    }
}
impl fmt::Display for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}
impl fmt::Debug for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "oid:{:016x}", self.0)
    }
}
impl fmt::Display for Ptid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Error parsing an id typed by a user.
#[derive(Debug, thiserror::Error)]
#[error("invalid {what} {input:?}: {expected}")]
pub struct ParseIdError {
    pub what: &'static str,
    pub input: String,
    pub expected: &'static str,
}

fn parse_u64(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else {
        s.parse().ok()
    }
}

impl FromStr for Tid {
    type Err = ParseIdError;
    /// NEO's syntax: `tid:<int>` (decimal or 0x hex), or a UNIX time as a float.
    fn from_str(s: &str) -> Result<Tid, ParseIdError> {
        let err = || ParseIdError {
            what: "TID",
            input: s.to_string(),
            expected: "expected tid:<integer> (0x for hex) or a UNIX time",
        };
        if let Some(rest) = s.strip_prefix("tid:") {
            return parse_u64(rest).map(Tid).ok_or_else(err);
        }
        match s.parse::<f64>() {
            Ok(t) if t.is_finite() && t >= 0.0 => Ok(Tid::from_unix(t)),
            _ => Err(err()),
        }
    }
}

impl FromStr for Oid {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Oid, ParseIdError> {
        let s2 = s.strip_prefix("oid:").unwrap_or(s);
        parse_u64(s2).map(Oid).ok_or_else(|| ParseIdError {
            what: "OID",
            input: s.to_string(),
            expected: "expected an integer (0x for hex)",
        })
    }
}

/// A node id. The high byte is a namespace per node type (as NEO): storages are positive and
/// persistent, masters/clients/admins negative and reassigned at each identification.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nid(pub i32);

impl Nid {
    pub fn namespace(t: crate::NodeType) -> i32 {
        match t {
            crate::NodeType::Storage => 0x00,
            crate::NodeType::Master => -0x10,
            crate::NodeType::Client => -0x20,
            crate::NodeType::Admin => -0x30,
        }
    }
    /// The `n`-th (from 1) id in the namespace of node type `t`.
    pub fn new(t: crate::NodeType, n: u32) -> Nid {
        Nid((Self::namespace(t) << 24) + (n & 0xff_ffff) as i32)
    }
    pub fn node_type(self) -> Option<crate::NodeType> {
        use crate::NodeType::*;
        [Storage, Master, Client, Admin].into_iter().find(|t| Self::namespace(*t) == self.0 >> 24)
    }
    pub fn number(self) -> u32 {
        (self.0 & 0xff_ffff) as u32
    }
}

impl fmt::Display for Nid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.node_type() {
            Some(t) => write!(f, "{}{}", t.letter(), self.number()),
            None => write!(f, "?{}", self.0),
        }
    }
}
impl fmt::Debug for Nid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Nid {
    type Err = ParseIdError;
    /// `S1`, `M2`, `C3`, `A1`, or a raw integer.
    fn from_str(s: &str) -> Result<Nid, ParseIdError> {
        let err = || ParseIdError {
            what: "node id",
            input: s.to_string(),
            expected: "expected S<n>, M<n>, C<n>, A<n> or an integer",
        };
        let mut chars = s.chars();
        let first = chars.next().ok_or_else(err)?;
        if let Some(t) = crate::NodeType::from_letter(first) {
            let n: u32 = chars.as_str().parse().map_err(|_| err())?;
            if n == 0 || n > 0xff_ffff {
                return Err(err());
            }
            return Ok(Nid::new(t, n));
        }
        s.parse::<i32>().map(Nid).map_err(|_| err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tid_time_roundtrip() {
        // 2024-02-29 12:34:56.5 UTC
        let t = 1_709_210_096.5;
        let tid = Tid::from_unix(t);
        assert!((tid.to_unix() - t).abs() < 1e-6, "{} vs {}", tid.to_unix(), t);
        assert!(Tid::from_unix(t + 0.001) > tid);
        // ZODB: TimeStamp(2000,1,1,0,0,0) = 0x034fd8a000000000? check the minutes part.
        let y2k = Tid::from_unix(946_684_800.0);
        assert_eq!(y2k.0 >> 32, (((100 * 12) * 31) * 24) * 60);
        assert_eq!(y2k.0 & 0xffff_ffff, 0);
    }

    #[test]
    fn parse_ids() {
        assert_eq!("tid:0x10".parse::<Tid>().unwrap(), Tid(16));
        assert_eq!("tid:17".parse::<Tid>().unwrap(), Tid(17));
        assert!("tid:zz".parse::<Tid>().is_err());
        assert!("nope".parse::<Tid>().is_err());
        let nid: Nid = "S3".parse().unwrap();
        assert_eq!(nid.to_string(), "S3");
        assert_eq!(nid.node_type(), Some(crate::NodeType::Storage));
        let m: Nid = "M1".parse().unwrap();
        assert!(m.0 < 0);
        assert_eq!(m.to_string(), "M1");
        assert!("X1".parse::<Nid>().is_err());
        assert!("S0".parse::<Nid>().is_err());
    }
}
