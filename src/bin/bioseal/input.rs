//! Input and output: embeddings (JSON arrays, `.npy`), consent options,
//! dates, digests, progress bars.

use super::*;

pub(crate) fn progress(len: u64, what: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(len).with_message(what);
    if let Ok(style) = ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} ({eta})") {
        bar.set_style(style);
    }
    bar
}

pub(crate) fn spinner(what: &'static str) -> ProgressBar {
    let s = ProgressBar::new_spinner().with_message(what);
    s.enable_steady_tick(std::time::Duration::from_millis(120));
    s
}

pub(crate) fn read_lines(path: &Path) -> R<Vec<String>> {
    let f = std::fs::File::open(path).map_err(|e| input(format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(|e| input(format!("{}: {e}", path.display())))?;
        if !line.trim().is_empty() {
            out.push(line);
        }
    }
    Ok(out)
}

/// An embedding from a JSON array of numbers or a float32/float64 `.npy`,
/// checked against the store's dimension.
pub(crate) fn read_embedding(path: &Path, dim: usize) -> R<Embedding> {
    let bytes = std::fs::read(path).map_err(|e| input(format!("{}: {e}", path.display())))?;
    let values = if bytes.starts_with(b"\x93NUMPY") {
        parse_npy(&bytes).map_err(|e| input(format!("{}: {e}", path.display())))?
    } else {
        serde_json::from_slice::<Vec<f32>>(&bytes).map_err(|e| {
            input(format!(
                "{}: malformed JSON (expected an array of numbers): {e}",
                path.display()
            ))
        })?
    };
    let e = Embedding::new(values);
    e.check(dim)
        .map_err(|err| input(format!("{}: invalid embedding: {err}", path.display())))?;
    Ok(e)
}

/// A one-dimensional (or 1 x n) little-endian float32 or float64 array in
/// NumPy's .npy format, versions 1 to 3.
pub(crate) fn parse_npy(b: &[u8]) -> Result<Vec<f32>, String> {
    let bad = |m: &str| format!("not a supported .npy file: {m}");
    let major = *b.get(6).ok_or_else(|| bad("truncated"))?;
    let (len, start): (usize, usize) = match major {
        1 => (
            usize::from(u16::from_le_bytes([
                *b.get(8).ok_or_else(|| bad("truncated"))?,
                *b.get(9).ok_or_else(|| bad("truncated"))?,
            ])),
            10,
        ),
        2 | 3 => {
            let h: [u8; 4] = b
                .get(8..12)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| bad("truncated"))?;
            (u32::from_le_bytes(h) as usize, 12)
        }
        _ => return Err(bad("unknown version")),
    };
    let header = b
        .get(start..start.saturating_add(len))
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("bad header"))?;
    let compact: String = header.chars().filter(|c| !c.is_whitespace()).collect();
    let width = if compact.contains("'descr':'<f4'") {
        4
    } else if compact.contains("'descr':'<f8'") {
        8
    } else {
        return Err(bad("dtype must be little-endian float32 or float64"));
    };
    if compact.contains("'fortran_order':True") {
        return Err(bad("Fortran order"));
    }
    let shape = compact
        .split("'shape':(")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let dims: Vec<usize> = shape
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("bad shape")))
        .collect::<Result<_, _>>()?;
    let n = match dims.as_slice() {
        [n] | [1, n] => *n,
        _ => return Err(bad("expected one vector (shape (n,) or (1, n))")),
    };
    let data = &b[start + len..];
    if Some(data.len()) != n.checked_mul(width) {
        return Err(bad("data length does not match the shape"));
    }
    Ok(if width == 4 {
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        data.chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                f64::from_le_bytes(a) as f32
            })
            .collect()
    })
}

pub(crate) fn consent_from(purposes: &[String], expires: &str, evidence: &[u8; 32]) -> R<Consent> {
    let purposes = purposes
        .iter()
        .map(|p| Purpose::new(p.clone()).map_err(|e| input(e.to_string())))
        .collect::<R<Vec<_>>>()?;
    Ok(Consent::new(purposes)
        .expires_at(parse_expiry(expires)?)
        .evidence(*evidence))
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `YYYY-MM-DD` (midnight UTC) or a duration from now: `90d`, `12w`, `1y`
/// (365 days), `36h`.
pub(crate) fn parse_expiry(s: &str) -> R<Timestamp> {
    let bad = || {
        input(format!(
            "bad --expires {s:?}: use a date (2027-06-01) or 90d, 12w, 1y, 36h, 30m, 90s"
        ))
    };
    if let Some((num, unit)) = s.char_indices().last().map(|(i, c)| (&s[..i], c)) {
        if let (Ok(n), Some(secs)) = (
            num.parse::<u64>(),
            match unit {
                's' => Some(1),
                'm' => Some(60),
                'h' => Some(3_600),
                'd' => Some(86_400),
                'w' => Some(7 * 86_400),
                'y' => Some(365 * 86_400),
                _ => None,
            },
        ) {
            let d = n.checked_mul(secs).ok_or_else(bad)?;
            return Ok(Timestamp::from_unix_secs(now_secs().saturating_add(d)));
        }
    }
    let parts: Vec<&str> = s.split('-').collect();
    let [y, m, d] = parts.as_slice() else {
        return Err(bad());
    };
    let (y, m, d): (i64, u32, u32) = (
        y.parse().map_err(|_| bad())?,
        m.parse().map_err(|_| bad())?,
        d.parse().map_err(|_| bad())?,
    );
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let days = days_from_civil(y, m, d);
    if days_to_civil(days) != (y, m, d) {
        return Err(bad());
    }
    Ok(Timestamp::from_unix_secs(days as u64 * 86_400))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub(crate) fn days_to_civil(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A timestamp as `YYYY-MM-DD HH:MM:SS UTC`.
pub(crate) fn when(t: Timestamp) -> String {
    let secs = t.unix_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let (y, m, d) = days_to_civil(days);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// A user key file (`--user-key`): 32 raw bytes or 64 hexadecimal digits.
/// The bytes read are wiped.
pub(crate) fn read_user_key(path: &Path) -> R<bioseal::UserKey> {
    let bytes = zeroize::Zeroizing::new(
        std::fs::read(path).map_err(|e| input(format!("{}: {e}", path.display())))?,
    );
    bioseal::UserKey::parse(&bytes).map_err(|e| input(format!("{}: {e}", path.display())))
}

pub(crate) fn sha256_file(path: &Path) -> R<[u8; 32]> {
    let bytes = std::fs::read(path).map_err(|e| input(format!("{}: {e}", path.display())))?;
    let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    Ok(out)
}

pub(crate) fn parse_hex32(s: &str) -> R<[u8; 32]> {
    let bad = || input(format!("evidence_sha256 must be 64 hex digits, got {s:?}"));
    if s.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_durations() {
        assert_eq!(
            parse_expiry("2027-06-01").ok(),
            Some(Timestamp::from_unix_secs(1_811_808_000))
        );
        assert_eq!(days_from_civil(2000, 2, 29), 11_016);
        assert_eq!(days_to_civil(11_016), (2000, 2, 29));
        for bad in [
            "2027-02-29",
            "2027-13-01",
            "2027-00-10",
            "27-1-1x",
            "",
            "d",
            "-5d",
            "1x",
        ] {
            assert!(parse_expiry(bad).is_err(), "{bad}");
        }
        let now = now_secs();
        let t = parse_expiry("90d").ok().map(|t| t.unix_secs());
        assert!(t.is_some_and(|t| t >= now + 90 * 86_400 && t <= now + 90 * 86_400 + 5));
    }

    #[test]
    fn npy_versions_and_shapes() {
        let body: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let file = |header: &str| {
            let mut b = b"\x93NUMPY\x01\x00".to_vec();
            b.extend_from_slice(&(header.len() as u16).to_le_bytes());
            b.extend_from_slice(header.as_bytes());
            b.extend_from_slice(&body);
            b
        };
        let ok = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
        assert_eq!(parse_npy(&file(ok)), Ok(vec![1.5, -2.0]));
        let row = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2), }";
        assert_eq!(parse_npy(&file(row)), Ok(vec![1.5, -2.0]));
        for bad in [
            "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }",
            "{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1), }",
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }",
            // Shapes whose byte count overflows (a debug build panicked).
            "{'descr': '<f8', 'fortran_order': False, 'shape': (2305843009213693952,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (18446744073709551615,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4611686018427387905), }",
        ] {
            assert!(parse_npy(&file(bad)).is_err(), "{bad}");
        }
        assert!(parse_npy(b"\x93NUMPY\x01").is_err());
    }

    #[test]
    fn timestamps_print_as_utc_dates() {
        assert_eq!(
            when(Timestamp::from_unix_secs(0)),
            "1970-01-01 00:00:00 UTC"
        );
        assert_eq!(
            when(Timestamp::from_unix_secs(1_811_808_000 + 3_723)),
            "2027-06-01 01:02:03 UTC"
        );
    }
}
