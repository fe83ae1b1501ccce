//! PNG bar charts drawn with plotters' bitmap backend. Text uses the 8x8
//! bitmap font of the `font8x8` crate, so no system fonts (or fontconfig)
//! are needed to build or run.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

/// One bar.
#[derive(Debug, Clone)]
pub struct Bar {
    /// Label left of the bar.
    pub label: String,
    /// Length of the bar (e.g. median IOPS); `None` draws no bar.
    pub value: Option<f64>,
    /// Low and high whisker (e.g. min and max over repeats).
    pub range: Option<(f64, f64)>,
    /// Text right of the bar.
    pub note: String,
    /// Highlight (e.g. the best target).
    pub best: bool,
}

const SCALE: i32 = 2;
const CHAR_W: i32 = 8 * SCALE;
const ROW_H: i32 = 34;

fn text<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    x: i32,
    y: i32,
    s: &str,
    color: &RGBColor,
) -> anyhow::Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing text: {e}");
    for (i, ch) in s.chars().enumerate() {
        let code = ch as usize;
        let glyph = if code < 128 {
            font8x8::legacy::BASIC_LEGACY[code]
        } else {
            font8x8::legacy::BASIC_LEGACY[b'?' as usize]
        };
        let cx = x + i as i32 * CHAR_W;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    let px = cx + col * SCALE;
                    let py = y + row as i32 * SCALE;
                    area.draw(&Rectangle::new(
                        [(px, py), (px + SCALE - 1, py + SCALE - 1)],
                        color.filled(),
                    ))
                    .map_err(err)?;
                }
            }
        }
    }
    Ok(())
}

/// Draw a horizontal bar chart into a PNG file.
pub fn bar_chart(path: &Path, title: &str, subtitle: &str, bars: &[Bar]) -> anyhow::Result<()> {
    let label_chars = bars
        .iter()
        .map(|b| b.label.chars().count())
        .max()
        .unwrap_or(4)
        .max(4) as i32;
    let note_chars = bars
        .iter()
        .map(|b| b.note.chars().count())
        .max()
        .unwrap_or(0) as i32;
    let left = 16 + label_chars * CHAR_W + 16;
    let bar_w = 420;
    let width = (left + bar_w + 16 + note_chars * CHAR_W + 16)
        .max(16 + title.chars().count() as i32 * CHAR_W + 16)
        .max(16 + subtitle.chars().count() as i32 * CHAR_W + 16);
    let height = 80 + bars.len() as i32 * ROW_H + 16;
    let root = BitMapBackend::new(path, (width as u32, height as u32)).into_drawing_area();
    let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(err)?;
    text(&root, 16, 12, title, &BLACK)?;
    text(&root, 16, 36, subtitle, &RGBColor(90, 90, 90))?;
    let max = bars
        .iter()
        .flat_map(|b| b.value.into_iter().chain(b.range.map(|r| r.1)))
        .fold(0f64, f64::max);
    let scale = |v: f64| {
        if max > 0.0 {
            ((v / max) * bar_w as f64).round() as i32
        } else {
            0
        }
    };
    let top = 70;
    root.draw(&PathElement::new(
        vec![(left, top - 4), (left, top + bars.len() as i32 * ROW_H)],
        RGBColor(120, 120, 120),
    ))
    .map_err(err)?;
    for (i, b) in bars.iter().enumerate() {
        let y = top + i as i32 * ROW_H;
        text(&root, 16, y + 9, &b.label, &BLACK)?;
        if let Some(v) = b.value {
            let color = if b.best {
                RGBColor(46, 139, 87)
            } else {
                RGBColor(70, 110, 180)
            };
            let w = scale(v).max(1);
            root.draw(&Rectangle::new(
                [(left, y + 4), (left + w, y + ROW_H - 6)],
                color.filled(),
            ))
            .map_err(err)?;
            if let Some((lo, hi)) = b.range {
                let (x0, x1) = (left + scale(lo), left + scale(hi));
                let mid = y + ROW_H / 2 - 1;
                let dark = RGBColor(30, 30, 30);
                root.draw(&PathElement::new(vec![(x0, mid), (x1, mid)], dark))
                    .map_err(err)?;
                for x in [x0, x1] {
                    root.draw(&PathElement::new(vec![(x, mid - 5), (x, mid + 5)], dark))
                        .map_err(err)?;
                }
            }
        }
        text(&root, left + bar_w + 16, y + 9, &b.note, &BLACK)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png() {
        let dir = std::env::temp_dir().join(format!("ballast-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.png");
        bar_chart(
            &p,
            "randread-4k-qd32: median IOPS",
            "3 repeats",
            &[
                Bar {
                    label: "nbdkit-memory".into(),
                    value: Some(120_000.0),
                    range: Some((110_000.0, 125_000.0)),
                    note: "120.0k IOPS p99 300us 1.00".into(),
                    best: true,
                },
                Bar {
                    label: "ballast".into(),
                    value: None,
                    range: None,
                    note: "skipped".into(),
                    best: false,
                },
            ],
        )
        .unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
