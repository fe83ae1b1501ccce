//! Parsing and formatting of byte sizes.
//!
//! Input: plain bytes (`4096`) or a number with a binary suffix, all powers
//! of 1024 and case-insensitive: `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB`,
//! `P`/`PiB` (an optional `B` after the number means bytes). Fractions are
//! allowed when they come out to whole bytes (`1.5G`). SI spellings like `GB`
//! are refused because they are ambiguous.

use std::fmt;

/// Shown in `--help` texts.
pub const SIZE_HELP: &str = "bytes, or a number with a K, M, G or T suffix (powers of 1024; \
                             KiB/MiB/GiB/TiB also accepted), e.g. 4096, 512M, 10G, 1.5T";

/// Why a size string was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeError(String);

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SizeError {}

const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

fn multiplier(unit: &str) -> Option<u64> {
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "p" | "pib" => 50,
        _ => return None,
    };
    Some(1u64 << shift)
}

/// Parse a size such as `10G`, `512MiB`, `1.5t` or `4096` into bytes.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    let fail = |why: String| SizeError(format!("invalid size {input:?}: {why}; pass {SIZE_HELP}"));
    if s.is_empty() {
        return Err(SizeError(format!("empty size; pass {SIZE_HELP}")));
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim());
    if !number.bytes().any(|b| b.is_ascii_digit()) {
        return Err(fail("expected a non-negative number".into()));
    }
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if frac_part.contains('.') {
        return Err(fail("more than one decimal point".into()));
    }
    let mult = match multiplier(unit) {
        Some(m) => m,
        None => {
            let lower = unit.to_ascii_lowercase();
            return Err(
                if matches!(lower.as_str(), "kb" | "mb" | "gb" | "tb" | "pb") {
                    let u = lower[..1].to_ascii_uppercase();
                    fail(format!(
                        "unit {unit:?} is ambiguous; use {u} or {u}iB (sizes are powers of 1024)"
                    ))
                } else {
                    fail(format!("unknown unit {unit:?}"))
                },
            );
        }
    };
    let too_large = || {
        SizeError(format!(
            "size {input:?} is too large (the maximum is {} bytes)",
            u64::MAX
        ))
    };
    // Leading zeros are harmless; long digit strings are too large anyway.
    let int_digits = int_part.trim_start_matches('0');
    if int_digits.len() > 20 || frac_part.len() > 18 {
        return Err(if int_digits.len() > 20 {
            too_large()
        } else {
            fail("too many decimal places".into())
        });
    }
    let int: u128 = if int_digits.is_empty() {
        0
    } else {
        int_digits.parse().map_err(|_| too_large())?
    };
    let mut bytes = int * u128::from(mult);
    if !frac_part.is_empty() {
        let frac: u128 = frac_part.parse().map_err(|_| fail("bad fraction".into()))?;
        let scale = 10u128.pow(frac_part.len() as u32);
        let frac_bytes = frac * u128::from(mult);
        if !frac_bytes.is_multiple_of(scale) {
            return Err(fail("that is not a whole number of bytes".into()));
        }
        bytes += frac_bytes / scale;
    }
    u64::try_from(bytes).map_err(|_| too_large())
}

/// clap value parser for sizes that must be greater than zero.
pub fn parse_nonzero_size(input: &str) -> Result<u64, SizeError> {
    match parse_size(input)? {
        0 => Err(SizeError(format!(
            "size must be greater than 0; pass {SIZE_HELP}"
        ))),
        n => Ok(n),
    }
}

/// clap value parser for block sizes (fit in 32 bits, > 0).
pub fn parse_block_size(input: &str) -> Result<u32, SizeError> {
    let n = parse_nonzero_size(input)?;
    u32::try_from(n).map_err(|_| {
        SizeError(format!(
            "block size {input:?} is too large; pass a power of two from 512 to 64K, e.g. 4K"
        ))
    })
}

/// Human-readable binary size: `512 B`, `1.0 KiB`, `1.5 GiB`, `100.0 GiB`.
pub fn format_size(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    // 1023.96 KiB would print as "1024.0 KiB": move up one unit instead.
    if (value * 10.0).round() / 10.0 >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A ratio such as `2.31x`; `-` when undefined.
pub fn format_ratio(ratio: f64) -> String {
    if ratio.is_finite() && ratio >= 0.0 {
        format!("{ratio:.2}x")
    } else {
        "-".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1024;

    #[test]
    fn parses_plain_and_suffixed() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4096B").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4 * K);
        assert_eq!(parse_size("4K").unwrap(), 4 * K);
        assert_eq!(parse_size("4KiB").unwrap(), 4 * K);
        assert_eq!(parse_size("4kib").unwrap(), 4 * K);
        assert_eq!(parse_size("512M").unwrap(), 512 * K * K);
        assert_eq!(parse_size("512MiB").unwrap(), 512 * K * K);
        assert_eq!(parse_size("10G").unwrap(), 10 * K * K * K);
        assert_eq!(parse_size("10 GiB").unwrap(), 10 * K * K * K);
        assert_eq!(parse_size(" 2t ").unwrap(), 2 * K * K * K * K);
        assert_eq!(parse_size("1TiB").unwrap(), K * K * K * K);
        assert_eq!(parse_size("1P").unwrap(), 1 << 50);
        assert_eq!(parse_size("007K").unwrap(), 7 * K);
    }

    #[test]
    fn parses_fractions() {
        assert_eq!(parse_size("1.5G").unwrap(), 3 * 512 * K * K);
        assert_eq!(parse_size("0.5K").unwrap(), 512);
        assert_eq!(parse_size(".25M").unwrap(), 256 * K);
        assert_eq!(parse_size("2.0").unwrap(), 2);
        let e = parse_size("1.3K").unwrap_err().to_string();
        assert!(e.contains("not a whole number of bytes"), "{e}");
        assert!(parse_size("0.5").is_err());
        assert!(parse_size("1.2.3G").is_err());
    }

    #[test]
    fn rejects_bad_input() {
        let e = parse_size("12Q").unwrap_err().to_string();
        assert!(e.contains("invalid size \"12Q\""), "{e}");
        assert!(e.contains("unknown unit \"Q\""), "{e}");
        assert!(e.contains("e.g. 4096, 512M, 10G"), "{e}");
        let e = parse_size("10GB").unwrap_err().to_string();
        assert!(e.contains("ambiguous; use G or GiB"), "{e}");
        assert!(parse_size("")
            .unwrap_err()
            .to_string()
            .contains("empty size"));
        assert!(parse_size("G").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("1 G B").is_err());
        assert!(parse_size("ten").is_err());
    }

    #[test]
    fn rejects_overflow() {
        assert_eq!(parse_size("18446744073709551615").unwrap(), u64::MAX);
        assert!(parse_size("18446744073709551616")
            .unwrap_err()
            .to_string()
            .contains("too large"));
        assert!(parse_size("16384P")
            .unwrap_err()
            .to_string()
            .contains("too large"));
        assert!(parse_size("99999999999999999999999T").is_err());
        assert_eq!(parse_size("16383P").unwrap(), 16383 << 50);
    }

    #[test]
    fn nonzero_and_block_sizes() {
        assert!(parse_nonzero_size("0")
            .unwrap_err()
            .to_string()
            .contains("greater than 0"));
        assert_eq!(parse_block_size("4K").unwrap(), 4096);
        assert_eq!(parse_block_size("64k").unwrap(), 65536);
        assert!(parse_block_size("8G").is_err());
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1.0 KiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(1 << 30), "1.0 GiB");
        assert_eq!(format_size(100 << 30), "100.0 GiB");
        assert_eq!(format_size((1 << 20) - 1), "1.0 MiB");
        assert_eq!(format_size(1 << 40), "1.0 TiB");
        assert_eq!(format_size(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn formats_ratios() {
        assert_eq!(format_ratio(2.3125), "2.31x");
        assert_eq!(format_ratio(1.0), "1.00x");
        assert_eq!(format_ratio(f64::NAN), "-");
        assert_eq!(format_ratio(f64::INFINITY), "-");
    }
}
