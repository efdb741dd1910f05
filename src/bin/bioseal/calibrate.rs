//! `bioseal calibrate`: a threshold for a target false-match rate.

use super::*;
use bioseal::calibrate::{self as cal, Calibration};

#[derive(Deserialize)]
pub(crate) struct PairLine {
    identity: String,
    embedding: Vec<f32>,
}

pub(crate) fn calibrate_cmd(
    cli: &Cli,
    pairs: &Path,
    target_fmr: f64,
    apply: bool,
    plot: Option<&Path>,
) -> R<u8> {
    cal::check_target_fmr(target_fmr)?;
    let lines = read_lines(pairs)?;
    let bar = progress(lines.len() as u64, "reading");
    let mut samples = Vec::with_capacity(lines.len());
    for (i, text) in lines.iter().enumerate() {
        let l: PairLine = serde_json::from_str(text).map_err(|e| {
            input(format!(
                "{} line {}: malformed JSON: {e}",
                pairs.display(),
                i + 1
            ))
        })?;
        samples.push((l.identity, Embedding::new(l.embedding)));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let dim = samples
        .first()
        .map(|(_, e)| e.dimension())
        .ok_or_else(|| input(format!("{} holds no samples", pairs.display())))?;
    let spinner = spinner("scoring pairs");
    let scores = cal::score_pairs(samples, dim)?;
    let c: Calibration = scores.calibrate(target_fmr);
    spinner.finish_and_clear();
    println!("genuine pairs     {}", c.genuine_pairs);
    println!("impostor pairs    {}", c.impostor_pairs);
    println!("target FMR        {:e}", c.target_fmr);
    println!("threshold         {} (cosine)", c.threshold.as_cosine());
    println!("FMR at threshold  {:.3e}", c.fmr);
    println!("FNMR at threshold {:.6}", c.fnmr);
    println!(
        "EER               {:.6} (at cosine {})",
        c.eer,
        c.eer_threshold.as_cosine()
    );
    if !c.met {
        eprintln!(
            "warning: no threshold up to cosine 1 reaches FMR <= {target_fmr:e}: impostor pairs score at the top of the scale"
        );
    }
    if c.fnmr > 0.05 {
        eprintln!(
            "warning: FNMR {:.2}% at the target FMR exceeds 5% (NIST SP 800-63B-4): this model \
             rejects too many genuine attempts at this FMR",
            c.fnmr * 100.0
        );
    }
    if let Some(path) = plot {
        plot::draw(path, &scores, &c)?;
        println!("plot              {}", path.display());
    }
    if !c.sufficient {
        eprintln!(
            "warning: {} impostor pairs cannot support FMR <= {:e}: at least {:.0} (3/FMR) are needed",
            c.impostor_pairs,
            target_fmr,
            (3.0 / target_fmr).ceil()
        );
    }
    if apply {
        let dir = settings_dir(cli)?;
        let mut s = read_settings(&dir)?;
        if s.dim != dim {
            return Err(input(format!(
                "the evaluation set has dimension {dim}, the store {}",
                s.dim
            )));
        }
        let (store, _) = open_with(cli, read_settings(&dir)?)?;
        store.set_threshold(c.threshold)?;
        drop(store);
        s.threshold = c.threshold.as_cosine();
        s.target_fmr = Some(target_fmr);
        s.calibration_source = Some(format!(
            "{} (sha256 {})",
            pairs.display(),
            hex(&sha256_file(pairs)?)
        ));
        write_settings(&dir, &s)?;
        println!(
            "applied to the keyring (audited); mirrored in {}",
            dir.join(SETTINGS_FILE).display()
        );
    }
    Ok(0)
}
