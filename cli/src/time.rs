//! Times and durations on the command line, parsed with `jiff`.
//!
//! A time (`--from-time`) is milliseconds since the Unix epoch, an RFC 3339 time with any
//! offset (`2026-12-01T10:00:00+01:00`, `2026-12-01T09:00:00Z`), `now`, or a time relative to
//! now: a signed duration (`-1h`, `-1h30m`, `+5m`) or one followed by `ago` (`90s ago`).
//! A duration is a number with units (`4s`, `500ms`, `1h30m`, or ISO 8601 `PT4S`); a bare
//! number counts in the unit the flag names in its help.
//!
//! Times are shown the way `--from-time` takes them: RFC 3339 in UTC to the second, followed
//! by how long ago that was (`2026-12-01T09:00:00Z (4m 10s ago)`), so a shown time can be
//! pasted back into a flag.

use std::time::Duration;

use jiff::{RoundMode, SignedDuration, Timestamp, TimestampRound, Unit};

/// `--from-time`: milliseconds since the Unix epoch.
pub fn parse_time(s: &str) -> Result<i64, String> {
    parse_time_at(s, Timestamp::now())
}

fn parse_time_at(s: &str, now: Timestamp) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    if s.eq_ignore_ascii_case("now") {
        return Ok(now.as_millisecond());
    }
    let relative = s.starts_with(['-', '+']) || s.ends_with("ago");
    let result = if relative {
        s.parse::<SignedDuration>()
            .map_err(|e| e.to_string())
            .and_then(|d| now.checked_add(d).map_err(|e| e.to_string()))
    } else {
        s.parse::<Timestamp>().map_err(|e| e.to_string())
    };
    result.map(|t| t.as_millisecond()).map_err(|reason| {
        let hint = if !relative && s.parse::<SignedDuration>().is_ok() {
            format!(" (for that long ago, write -{s})")
        } else {
            String::new()
        };
        format!(
            "'{s}' is not a time{hint}: use an RFC 3339 time such as 2026-12-01T10:00:00+01:00, a time relative to now such as -1h, or milliseconds since the epoch ({reason})"
        )
    })
}

/// A duration flag whose bare numbers count seconds (`--timeout 60` is a minute).
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    parse_duration(s, Duration::from_secs)
}

/// A duration flag whose bare numbers count milliseconds (`--linger 5` is 5 ms).
pub fn parse_millis(s: &str) -> Result<Duration, String> {
    parse_duration(s, Duration::from_millis)
}

fn parse_duration(s: &str, bare: fn(u64) -> Duration) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u64>() {
        return Ok(bare(n));
    }
    let err = |reason: String| {
        format!("'{s}' is not a duration: use a number with units such as 500ms, 4s or 1h30m ({reason})")
    };
    let d = s.parse::<SignedDuration>().map_err(|e| err(e.to_string()))?;
    Duration::try_from(d).map_err(|_| err("it is negative".into()))
}

/// A time in milliseconds since the Unix epoch, for people: RFC 3339 UTC and its age.
pub fn format_time(ms: i64) -> String {
    format_time_at(ms, Timestamp::now())
}

fn format_time_at(ms: i64, now: Timestamp) -> String {
    let Ok(t) = Timestamp::from_millisecond(ms) else {
        return format!("{ms} ms since the epoch (out of range)");
    };
    let shown = t
        .round(TimestampRound::new().smallest(Unit::Second).mode(RoundMode::Trunc))
        .unwrap_or(t);
    // From the exact times, so that a write half a second ago never shows as in the future.
    let age_secs = now.as_millisecond().saturating_sub(ms) / 1000;
    let age = |secs: i64| format!("{:#}", SignedDuration::from_secs(secs));
    match age_secs {
        0 => format!("{shown} (just now)"),
        s if s > 0 => format!("{shown} ({} ago)", age(s)),
        // The broker's clock may run ahead of ours.
        s => format!("{shown} (in {})", age(-s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    #[test]
    fn parses_epoch_millis_and_rfc3339_with_any_offset() {
        let now = at("2026-12-01T12:00:00Z");
        assert_eq!(parse_time_at("1700000000000", now), Ok(1_700_000_000_000));
        assert_eq!(parse_time_at("1970-01-01T00:00:00Z", now), Ok(0));
        assert_eq!(parse_time_at("2023-11-14T22:13:20Z", now), Ok(1_700_000_000_000));
        assert_eq!(parse_time_at("2023-11-14T22:13:20.5Z", now), Ok(1_700_000_000_500));
        assert_eq!(
            parse_time_at("2026-12-01T10:00:00+01:00", now),
            parse_time_at("2026-12-01T09:00:00Z", now),
            "an offset is honoured"
        );
        assert_eq!(
            parse_time_at("2026-12-01T04:00:00-05:00", now),
            parse_time_at("2026-12-01T09:00:00Z", now)
        );
    }

    #[test]
    fn parses_times_relative_to_now() {
        let now = at("2026-12-01T12:00:00Z");
        let ms = |s| parse_time_at(s, now);
        assert_eq!(ms("now"), Ok(now.as_millisecond()));
        assert_eq!(ms("-1h"), ms("2026-12-01T11:00:00Z"));
        assert_eq!(ms("-1h30m"), ms("2026-12-01T10:30:00Z"));
        assert_eq!(ms("+5m"), ms("2026-12-01T12:05:00Z"));
        assert_eq!(ms("90s ago"), ms("2026-12-01T11:58:30Z"));
    }

    #[test]
    fn refuses_what_is_not_a_time_and_says_what_is() {
        let now = at("2026-12-01T12:00:00Z");
        let e = parse_time_at("yesterday", now).expect_err("not a time");
        assert!(e.contains("'yesterday' is not a time") && e.contains("-1h"), "{e}");
        let e = parse_time_at("1h", now).expect_err("a duration without a sign is ambiguous");
        assert!(e.contains("write -1h"), "{e}");
        assert!(
            parse_time_at("2026-12-01T10:00:00", now).is_err(),
            "a civil time needs its offset"
        );
        assert!(parse_time_at("2026-13-01T10:00:00Z", now).is_err());
    }

    #[test]
    fn parses_durations_with_units_and_bare_numbers_in_the_flags_unit() {
        assert_eq!(parse_secs("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_secs("4s"), Ok(Duration::from_secs(4)));
        assert_eq!(parse_secs("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_secs("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_secs("PT4S"), Ok(Duration::from_secs(4)));
        assert_eq!(parse_millis("5"), Ok(Duration::from_millis(5)));
        assert_eq!(parse_millis("2s"), Ok(Duration::from_secs(2)));
        let e = parse_secs("-4s").expect_err("negative");
        assert!(e.contains("negative"), "{e}");
        let e = parse_secs("soon").expect_err("not a duration");
        assert!(e.contains("'soon' is not a duration") && e.contains("500ms"), "{e}");
    }

    #[test]
    fn formats_times_as_rfc3339_utc_with_their_age() {
        let now = at("2026-12-01T12:00:00Z");
        let shown = |s: &str| format_time_at(at(s).as_millisecond(), now);
        assert_eq!(shown("2026-12-01T11:55:49.600Z"), "2026-12-01T11:55:49Z (4m 10s ago)");
        assert_eq!(shown("2026-11-30T10:00:00Z"), "2026-11-30T10:00:00Z (26h ago)");
        assert_eq!(shown("2026-12-01T11:59:59.900Z"), "2026-12-01T11:59:59Z (just now)");
        assert_eq!(shown("2026-12-01T12:00:00.900Z"), "2026-12-01T12:00:00Z (just now)");
        assert_eq!(shown("2026-12-01T12:00:03Z"), "2026-12-01T12:00:03Z (in 3s)");
        let round_trip = format_time_at(1_700_000_000_000, now);
        let pasted = round_trip.split(' ').next().expect("time");
        assert_eq!(parse_time_at(pasted, now), Ok(1_700_000_000_000), "{round_trip}");
        assert!(format_time_at(i64::MAX, now).contains("out of range"));
    }
}
