//! Small text helpers of the client: times, tables, base64, percent-encoding, `K=V` flags and
//! one-line summaries of JSON. Pure functions, unit-tested here.

use serde_json::Value;
use std::fmt::Write as _;

/// Milliseconds since the Unix epoch as UTC, `2026-12-01T21:17:08Z`.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Like [`utc`] with milliseconds, `2026-12-01T21:17:08.123Z`, for event logs.
pub fn utc_ms(ms: u64) -> String {
    let s = utc(ms);
    format!("{}.{:03}Z", &s[..s.len() - 1], ms % 1000)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A span of milliseconds, coarse: `45s`, `4m59s`, `2h5m`, `3d4h`.
pub fn span(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s / 60) % 60),
        _ => format!("{}d{}h", s / 86_400, (s / 3600) % 24),
    }
}

/// `at` relative to `now`: `in 4m59s` or `3m02s ago`.
pub fn relative(at: u64, now: u64) -> String {
    if at >= now {
        format!("in {}", span(at - now))
    } else {
        format!("{} ago", span(now - at))
    }
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A plain table: a header row and aligned columns, two spaces apart; the last column is not
/// padded. Every line ends with a newline.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let cells: Vec<&str> = cells.collect();
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let pad = widths.get(i).copied().unwrap_or(0);
                let _ = write!(l, "{c:<pad$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// Percent-encodes one URL path segment (everything but unreserved characters).
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `K=V` from a flag; `flag` names it in the error.
pub fn parse_kv(s: &str, flag: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{flag} {s}: write K=V")),
    }
}

/// A duration flag (`500ms`, `5s`, `2m`, `1h`, or plain seconds) in seconds, as a float.
pub fn parse_secs(s: &str, flag: &str) -> Result<f64, String> {
    if let Ok(n) = s.parse::<f64>() {
        if n.is_finite() && n >= 0.0 {
            return Ok(n);
        }
    }
    moat_policy::parse_duration(s)
        .map(|d| d.as_secs_f64())
        .map_err(|e| format!("{flag} {s}: {e}"))
}

/// A duration flag in whole seconds, rounded up (a sandbox asked to live 500ms gets 1s).
pub fn parse_whole_secs(s: &str, flag: &str) -> Result<u64, String> {
    let f = parse_secs(s, flag)?;
    if f > u64::MAX as f64 / 2.0 {
        return Err(format!("{flag} {s}: too long"));
    }
    Ok(f.ceil() as u64)
}

/// A JSON value as a short one-line summary: an object as `k=v k=v` (strings unquoted when
/// they have no space), arrays and nested objects as compact JSON; cut at `max` characters.
pub fn summary(v: &Value, max: usize) -> String {
    let s = match v {
        Value::Null => String::new(),
        Value::Object(map) => {
            let mut s = String::new();
            for (k, v) in map.iter().filter(|(_, v)| !v.is_null()) {
                if !s.is_empty() {
                    s.push(' ');
                }
                match v.as_u64() {
                    // Times (`expires_at`...) as times, not as milliseconds.
                    Some(ms) if k.ends_with("_at") => {
                        let _ = write!(s, "{k}={}", utc(ms));
                    }
                    _ => {
                        let _ = write!(s, "{k}={}", scalar(v));
                    }
                }
            }
            s
        }
        other => scalar(other),
    };
    cut(&s, max)
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) if !s.is_empty() && !s.contains(char::is_whitespace) => s.clone(),
        other => other.to_string(),
    }
}

/// `s` cut to `max` characters, with `…` when it was longer.
pub fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Metadata as `k=v,k=v` for a table cell.
pub fn metadata_cell(v: &Value) -> String {
    match v.as_object() {
        Some(map) if !map.is_empty() => map
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    v.as_str().map_or_else(|| v.to_string(), str::to_string)
                )
            })
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_159_828_000), "2026-12-01T21:17:08Z");
        assert_eq!(utc_ms(1_796_159_828_123), "2026-12-01T21:17:08.123Z");
    }

    #[test]
    fn spans_and_relative_times() {
        assert_eq!(span(999), "0s");
        assert_eq!(span(45_000), "45s");
        assert_eq!(span(299_000), "4m59s");
        assert_eq!(span(7_500_000), "2h05m");
        assert_eq!(span(3 * 86_400_000 + 4 * 3_600_000), "3d4h");
        assert_eq!(relative(10_000, 5_000), "in 5s");
        assert_eq!(relative(5_000, 65_000), "1m00s ago");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["ID", "STATE", "META"],
            &[
                vec!["sbx_1".into(), "running".into(), "a=b".into()],
                vec!["sbx_22222".into(), "paused".into(), "-".into()],
            ],
        );
        assert_eq!(
            t,
            "ID         STATE    META\nsbx_1      running  a=b\nsbx_22222  paused   -\n"
        );
        assert_eq!(table(&["A", "B"], &[]), "A  B\n");
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(path_segment("sbx_ab-1.2~"), "sbx_ab-1.2~");
        assert_eq!(path_segment("a/b c?"), "a%2Fb%20c%3F");
    }

    #[test]
    fn kv_and_durations_parse() {
        assert_eq!(
            parse_kv("A=b=c", "-e").unwrap(),
            ("A".to_string(), "b=c".to_string())
        );
        assert_eq!(parse_kv("A=", "-e").unwrap().1, "");
        assert!(parse_kv("A", "-e").unwrap_err().contains("write K=V"));
        assert!(parse_kv("=x", "--meta").is_err());
        assert_eq!(parse_secs("30", "--timeout").unwrap(), 30.0);
        assert_eq!(parse_secs("1.5", "--timeout").unwrap(), 1.5);
        assert_eq!(parse_secs("500ms", "--timeout").unwrap(), 0.5);
        assert_eq!(parse_secs("2m", "--timeout").unwrap(), 120.0);
        assert!(parse_secs("soon", "--timeout")
            .unwrap_err()
            .starts_with("--timeout soon"));
        assert_eq!(parse_whole_secs("500ms", "--ttl").unwrap(), 1);
        assert_eq!(parse_whole_secs("10m", "--ttl").unwrap(), 600);
    }

    #[test]
    fn summaries_are_one_short_line() {
        let v = json!({"cmd": ["ls", "-l"], "cwd": null, "exit_code": 0, "path": "/work/a b"});
        assert_eq!(
            summary(&v, 200),
            "cmd=[\"ls\",\"-l\"] exit_code=0 path=\"/work/a b\""
        );
        assert_eq!(summary(&json!(null), 10), "");
        assert_eq!(
            summary(&json!({"expires_at": 1_796_159_828_000u64, "n": 3}), 100),
            "expires_at=2026-12-01T21:17:08Z n=3"
        );
        assert_eq!(summary(&json!({"a": "xxxxxxxxxx"}), 6), "a=xxx…");
        assert_eq!(metadata_cell(&json!({"a": "1", "b": 2})), "a=1,b=2");
        assert_eq!(metadata_cell(&json!({})), "-");
    }
}
