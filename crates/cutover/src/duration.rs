//! Durations as people write them in flags and config: "250ms", "5s", "2m", "1h".

use std::time::Duration;

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let hint = "write a whole number followed by ms, s, m or h, e.g. \"500ms\" or \"30s\"";
    if num.is_empty() {
        return Err(format!("'{text}' is not a duration: {hint}"));
    }
    let n: u64 = num.parse().map_err(|_| format!("'{text}' is too large a duration"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "" => return Err(format!("'{text}' has no unit: {hint}")),
        _ => return Err(format!("'{text}' has an unknown unit '{unit}': {hint}")),
    };
    ms.map(Duration::from_millis).ok_or_else(|| format!("'{text}' is too large a duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn rejects_with_a_hint() {
        for bad in ["", "5", "s", "5 sec", "1.5s", "-1s", "99999999999999999999s"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains(bad.trim()), "{e}");
        }
        assert!(parse_duration("5x").unwrap_err().contains("unknown unit"));
    }
}
