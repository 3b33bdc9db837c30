//! The value types of flags and of `fleetsync.toml`: `N|N%` limits and
//! durations. One parser each, so a flag and its file key accept exactly
//! the same spellings.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// `--batch` and `--max-errors`: a node count or a share of the fleet, as
/// SSM's MaxConcurrency and MaxErrors take them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Count(usize),
    /// 0..=100.
    Percent(u8),
}

impl Limit {
    /// The count for a fleet of `total` nodes. A share rounds down, as SSM
    /// does, so `10%` of 15 nodes is 1.
    pub fn of(self, total: usize) -> usize {
        match self {
            Limit::Count(n) => n,
            Limit::Percent(p) => total * p as usize / 100,
        }
    }
}

impl FromStr for Limit {
    type Err = String;

    fn from_str(s: &str) -> Result<Limit, String> {
        let bad = || format!("{s:?} is not a node count or a percentage: use a number like 10 or a share like 25%");
        match s.trim().strip_suffix('%') {
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= 100 => Ok(Limit::Percent(p)),
                _ => Err(bad()),
            },
            None => s.trim().parse().map(Limit::Count).map_err(|_| bad()),
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Count(n) => write!(f, "{n}"),
            Limit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// In `fleetsync.toml` a limit is `batch = 10` or `batch = "25%"`.
impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Limit, D::Error> {
        match NumberOrText::deserialize(d)? {
            NumberOrText::Number(n) => {
                usize::try_from(n).map(Limit::Count).map_err(|_| de::Error::custom(format!("{n} is not a node count")))
            }
            NumberOrText::Text(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

use fleetsync::duration::NumberOrText;
pub use fleetsync::duration::Seconds;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_and_refuse() {
        assert_eq!("10".parse(), Ok(Limit::Count(10)));
        assert_eq!("25%".parse(), Ok(Limit::Percent(25)));
        assert_eq!(Limit::Percent(10).of(15), 1);
        assert_eq!(Limit::Percent(100).of(60), 60);
        for bad in ["", "-1", "101%", "x%", "5 nodes"] {
            assert!(bad.parse::<Limit>().is_err(), "{bad}");
        }
    }
}
