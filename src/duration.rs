//! Durations as people write them in flags and config files: `90`
//! (seconds), `90s`, `5m`, `1h`. One parser for both commands and both
//! config files, so a duration reads the same everywhere.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// A duration: `90` (seconds), `90s`, `5m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Duration);

impl FromStr for Seconds {
    type Err = String;

    fn from_str(s: &str) -> Result<Seconds, String> {
        let t = s.trim();
        let (number, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
            Some(i) => t.split_at(i),
            None => (t, "s"),
        };
        let scale = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => 0,
        };
        match number.parse::<u64>() {
            Ok(n) if scale > 0 => Ok(Seconds(Duration::from_secs(n * scale))),
            _ => Err(format!("{s:?} is not a duration: use seconds like 90, or 90s, 5m, 1h")),
        }
    }
}

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}s", self.0.as_secs())
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Seconds, D::Error> {
        match NumberOrText::deserialize(d)? {
            NumberOrText::Number(n) => {
                u64::try_from(n).map(|n| Seconds(Duration::from_secs(n))).map_err(|_| de::Error::custom(format!("{n} is not a duration")))
            }
            NumberOrText::Text(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

/// A config value written as a number or as a string (`timeout = 90` or
/// `timeout = "90s"`; the bastion's limits too: `batch = 10`, `"25%"`).
#[derive(Deserialize)]
#[serde(untagged)]
pub enum NumberOrText {
    Number(i64),
    Text(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_the_rest() {
        assert_eq!("90".parse(), Ok(Seconds(Duration::from_secs(90))));
        assert_eq!("5m".parse(), Ok(Seconds(Duration::from_secs(300))));
        assert_eq!("1h".parse(), Ok(Seconds(Duration::from_secs(3600))));
        for bad in ["", "m", "5d", "-3s", "1.5m"] {
            assert!(bad.parse::<Seconds>().is_err(), "{bad}");
        }
    }
}
