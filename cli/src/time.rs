//! Parsing `--from-time`: milliseconds since the Unix epoch, or an RFC 3339 UTC time such as
//! `2026-11-21T08:00:00Z` (fractional seconds allowed).

pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let err = || format!("'{s}' is not a time: use milliseconds since the epoch or 2026-11-21T08:00:00Z");
    let s = s
        .strip_suffix('Z')
        .or_else(|| s.strip_suffix("+00:00"))
        .ok_or_else(err)?;
    let (date, time) = s.split_once('T').ok_or_else(err)?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = match (d.next(), d.next(), d.next()) {
        (Some(Ok(y)), Some(Ok(m)), Some(Ok(day))) if (1..=12).contains(&m) && (1..=31).contains(&day) => (y, m, day),
        _ => return Err(err()),
    };
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':').map(|p| p.parse::<i64>());
    let (hh, mm, ss) = match (t.next(), t.next(), t.next()) {
        (Some(Ok(h)), Some(Ok(m)), Some(Ok(s))) if h < 24 && m < 60 && s < 61 => (h, m, s),
        _ => return Err(err()),
    };
    let millis = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().chain("000".chars()).take(3).collect();
        digits.parse::<i64>().map_err(|_| err())?
    };
    Ok(((days_from_civil(y, m, day) * 24 + hh) * 60 + mm) * 60_000 + ss * 1000 + millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_epoch_millis_and_rfc3339() {
        assert_eq!(parse_time("1700000000000"), Ok(1_700_000_000_000));
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        assert_eq!(parse_time("2023-11-14T22:13:20.5Z"), Ok(1_700_000_000_500));
        assert!(parse_time("yesterday").is_err());
    }
}
