//! `bioseal calibrate --plot FILE.png`: the genuine and impostor score
//! histograms and the DET curve (FNMR against FMR, both on log scales),
//! with the chosen threshold and the NIST SP 800-63B-4 limits (FMR 1e-4,
//! FNMR 5%) marked.

use super::*;
use bioseal::calibrate::{Calibration, Scores, SCORE_ONE};
use plotters::prelude::*;

/// NIST SP 800-63B-4: at most FMR 1e-4 and FNMR 5% (at that FMR).
const NIST_FMR: f64 = 1e-4;
const NIST_FNMR: f64 = 0.05;
const SIZE: (u32, u32) = (1400, 600);
/// The lowest rate the log axes show; a rate of 0 is drawn there.
const FLOOR: f64 = 1e-6;

/// Where to find a TrueType font for the labels: `$BIOSEAL_PLOT_FONT`, or
/// DejaVu Sans where Linux distributions put it (Debian: fonts-dejavu-core).
fn font() -> R<&'static [u8]> {
    let candidates: Vec<PathBuf> = match std::env::var_os("BIOSEAL_PLOT_FONT") {
        Some(p) => vec![PathBuf::from(p)],
        None => [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
        ]
        .iter()
        .map(PathBuf::from)
        .collect(),
    };
    for p in &candidates {
        if let Ok(bytes) = std::fs::read(p) {
            // Registered once per process, for its whole life.
            return Ok(Box::leak(bytes.into_boxed_slice()));
        }
    }
    Err(input(
        "no font for the plot's labels: install DejaVu Sans (Debian: fonts-dejavu-core) \
         or set BIOSEAL_PLOT_FONT to a .ttf file",
    ))
}

fn cos(fixed: i64) -> f64 {
    fixed as f64 / SCORE_ONE as f64
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Fail {
    Fail(9, format!("cannot draw {}: {e}", path.display()))
}

/// Draw the plot for `scores` and the calibration `c` into `path` (PNG).
pub(crate) fn draw(path: &Path, scores: &Scores, c: &Calibration) -> R<()> {
    let bytes = font()?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| input("the plot font is not a valid TrueType/OpenType file"))?;
    let e = |err| plot_err(path, err);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let (left, right) = root.split_horizontally(SIZE.0 / 2);
    histograms(&left, scores, c).map_err(|err| plot_err(path, err))?;
    det(&right, scores, c).map_err(|err| plot_err(path, err))?;
    root.present().map_err(|err| plot_err(path, err))?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Genuine and impostor score histograms (each as a fraction of its own
/// pairs), with the threshold.
fn histograms(area: &Area<'_>, s: &Scores, c: &Calibration) -> DrawResult {
    const BINS: usize = 100;
    let t = f64::from(c.threshold.as_cosine());
    let lo = cos(s.impostor[0].min(s.genuine[0])).clamp(-1.0, t - 0.05);
    let width = (1.0 - lo) / BINS as f64;
    let bin = |x: i64| (((cos(x) - lo) / width) as usize).min(BINS - 1);
    let mut g = vec![0f64; BINS];
    let mut im = vec![0f64; BINS];
    for &x in &s.genuine {
        g[bin(x)] += 1.0 / s.genuine.len() as f64;
    }
    for &x in &s.impostor {
        im[bin(x)] += 1.0 / s.impostor.len() as f64;
    }
    let top = g.iter().chain(&im).copied().fold(0.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption("Scores (cosine, store arithmetic)", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(lo..1.0, 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("similarity (cosine)")
        .y_desc("fraction of pairs")
        .label_style(("sans-serif", 14))
        .draw()?;
    for (series, color, name, n) in [
        (&im, RED, "impostor pairs", s.impostor.len()),
        (&g, BLUE, "genuine pairs", s.genuine.len()),
    ] {
        chart
            .draw_series(series.iter().enumerate().map(|(i, &y)| {
                let x0 = lo + i as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width, y)], color.mix(0.45).filled())
            }))?
            .label(format!("{name} ({n})"))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .draw_series(LineSeries::new([(t, 0.0), (t, top)], BLACK.stroke_width(2)))?
        .label(format!("threshold {t:.4} (FMR {:.1e})", c.fmr))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], BLACK.stroke_width(2)));
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

/// The DET curve: FNMR against FMR over every threshold, log-log, with the
/// chosen threshold and the NIST limits.
fn det(area: &Area<'_>, s: &Scores, c: &Calibration) -> DrawResult {
    let mut chart = ChartBuilder::on(area)
        .caption(
            "DET curve (a rate of 0 is drawn at 1e-6)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((FLOOR..1.0).log_scale(), (FLOOR..1.0).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("false-match rate (FMR)")
        .y_desc("false-non-match rate (FNMR)")
        .x_label_formatter(&|x| format!("{x:.0e}"))
        .y_label_formatter(&|y| format!("{y:.0e}"))
        .label_style(("sans-serif", 14))
        .draw()?;
    // Thresholds at every distinct score, thinned to about 2,000 points.
    let mut all: Vec<i64> = s.genuine.iter().chain(&s.impostor).copied().collect();
    all.sort_unstable();
    all.dedup();
    let step = (all.len() / 2_000).max(1);
    let points: Vec<(f64, f64)> = all
        .iter()
        .step_by(step)
        .map(|&t| (s.fmr(t).max(FLOOR), s.fnmr(t).max(FLOOR)))
        .collect();
    chart
        .draw_series(LineSeries::new(points, BLUE.stroke_width(2)))?
        .label("this evaluation set")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], BLUE.stroke_width(2)));
    let grey = RGBColor(120, 120, 120);
    chart
        .draw_series(LineSeries::new(
            [(NIST_FMR, FLOOR), (NIST_FMR, 1.0)],
            grey.stroke_width(2),
        ))?
        .label("NIST SP 800-63B-4: FMR 1e-4")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 12, y)], grey.stroke_width(2)));
    let orange = RGBColor(230, 120, 0);
    chart
        .draw_series(LineSeries::new(
            [(FLOOR, NIST_FNMR), (1.0, NIST_FNMR)],
            orange.stroke_width(2),
        ))?
        .label("NIST SP 800-63B-4: FNMR 5%")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 12, y)], orange.stroke_width(2)));
    let at = (c.fmr.max(FLOOR), c.fnmr.max(FLOOR));
    chart
        .draw_series([Circle::new(at, 7, BLACK.filled())])?
        .label(format!(
            "threshold {:.4}: FMR {:.1e}, FNMR {:.2}%",
            c.threshold.as_cosine(),
            c.fmr,
            c.fnmr * 100.0
        ))
        .legend(|(x, y)| Circle::new((x + 6, y), 5, BLACK.filled()));
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}
