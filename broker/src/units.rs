//! Config values with units: [`ByteSize`] ("64MiB", "4KiB", 1024) and [`Millis`] ("7d",
//! "500ms", "30s"). Parsing errors name the accepted forms.

use std::time::Duration;

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    Int(u64),
    Str(String),
}

/// Splits `"64MiB"` into 64 and `"MiB"`; `example` names the accepted forms in the error.
fn number_and_unit<'a>(s: &'a str, example: &str) -> Result<(u64, &'a str), String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n = num.parse().map_err(|_| format!("'{s}' is not {example}"))?;
    Ok((n, unit.trim()))
}

/// A size in bytes; written as an integer or with a unit (B, KB, MB, GB, KiB, MiB, GiB, TiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Raw")]
pub struct ByteSize(pub u64);

impl TryFrom<Raw> for ByteSize {
    type Error = String;
    fn try_from(raw: Raw) -> Result<Self, String> {
        match raw {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => s.parse(),
        }
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (n, unit) = number_and_unit(s, "a size (examples: 1048576, 512KiB, 64MiB, 1GiB)")?;
        let mult: u64 = match unit {
            "" | "B" => 1,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown size unit '{other}' in '{s}' (use B, KB, MB, GB, KiB, MiB, GiB, TiB)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size '{s}' overflows"))
    }
}

/// A duration; written as milliseconds or with a unit (ms, s, m, h, d).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Raw")]
pub struct Millis(pub Duration);

impl TryFrom<Raw> for Millis {
    type Error = String;
    fn try_from(raw: Raw) -> Result<Self, String> {
        match raw {
            Raw::Int(n) => Ok(Millis(Duration::from_millis(n))),
            Raw::Str(s) => s.parse(),
        }
    }
}

impl std::str::FromStr for Millis {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (n, unit) = number_and_unit(s, "a duration (examples: 500ms, 30s, 5m, 1h, 7d)")?;
        let ms: u64 = match unit {
            "" | "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            other => return Err(format!("unknown duration unit '{other}' in '{s}' (use ms, s, m, h, d)")),
        };
        n.checked_mul(ms)
            .map(|ms| Millis(Duration::from_millis(ms)))
            .ok_or_else(|| format!("duration '{s}' overflows"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse_with_units() {
        assert_eq!("64MiB".parse::<ByteSize>(), Ok(ByteSize(64 << 20)));
        assert_eq!("1000".parse::<ByteSize>(), Ok(ByteSize(1000)));
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert_eq!("7d".parse::<Millis>(), Ok(Millis(Duration::from_secs(7 * 86_400))));
        assert_eq!("250ms".parse::<Millis>(), Ok(Millis(Duration::from_millis(250))));
        assert!("soon".parse::<Millis>().is_err_and(|e| e.contains("examples")));
    }
}
