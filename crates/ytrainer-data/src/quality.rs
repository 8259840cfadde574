//! Corpus-quality scores of one sample from its per-token series (`ytrainer sort`), free of any tensor library.
//!
//! Inputs are the answer tokens' cross-entropy `l_t` and the predictive entropy `H_t` **of the distribution that
//! predicts target t** (the original tool paired `l_t` with the entropy one position off; see
//! [`series_from_log_probs`] for the alignment, which the trainer's `step::to_device` rows follow too).
//!
//! Four scores, higher = more suspicious:
//! - `filtered`: `sum_t [1 if H_t <= 1 and l_t > 3; 0.5 if H_t > 1 and l_t > 3; else 0]`.
//! - `similarity`: `-Pearson(H, l)`; 0 with a reason when undefined (< 3 tokens, constant series).
//! - `divergence`: centred rolling mean (window 3; the edges average the 2 values they have), z-score within the
//!   sample (population standard deviation; a constant series gives z = 0), `d_t = z(l)_t - z(H)_t`, one class
//!   per token, score `sum over non-normal |d_t| / n`, error spans = runs of non-normal tokens whose
//!   `max |d| >= 1.96`.
//! - `ifd` (instruction-following difficulty, Li et al. 2023, "From Quantity to Quality"): the answer's
//!   perplexity given its prompt over its perplexity with the prompt emptied, `exp(mean l_cond - mean l_free)`
//!   over the answer tokens both passes have. Near or above 1 the prompt does not help predict the answer: the
//!   signature of an answer that belongs to another record or to no prompt at all. The three modes above look
//!   only at the shape of one pass's series, so they cannot see a fluent answer that is merely misplaced.
//!
//! Nothing here returns NaN: a degenerate sample gets a finite score and a [`Analysis::reason`].

use std::fmt;
use std::str::FromStr;

/// Which score ranks the samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QualityMode {
    Filtered,
    Similarity,
    Divergence,
    Ifd,
}

impl QualityMode {
    pub fn name(self) -> &'static str {
        match self {
            QualityMode::Filtered => "filtered",
            QualityMode::Similarity => "similarity",
            QualityMode::Divergence => "divergence",
            QualityMode::Ifd => "ifd",
        }
    }
}

impl fmt::Display for QualityMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for QualityMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "filtered" => Ok(QualityMode::Filtered),
            "similarity" => Ok(QualityMode::Similarity),
            "divergence" => Ok(QualityMode::Divergence),
            "ifd" => Ok(QualityMode::Ifd),
            other => Err(format!(
                "unknown mode `{other}`: expected filtered, similarity, divergence or ifd"
            )),
        }
    }
}

/// Loss above which a token counts in `filtered` mode.
pub const FILTERED_LOSS: f64 = 3.0;
/// Entropy at or below which a high-loss token is "confidently wrong" (counts 1 instead of 0.5).
pub const FILTERED_ENTROPY: f64 = 1.0;
/// |z| border of the divergence classes.
pub const Z_CLASS: f64 = 0.6;
/// z(H) below which a token with above-mean loss is "suspicious certainty".
pub const Z_CERTAIN: f64 = -1.0;
/// A run of non-normal tokens is an error span when its largest |d| reaches this.
pub const SPAN_D: f64 = 1.96;
/// Fewer answer tokens than this make a sample degenerate.
pub const MIN_TOKENS: usize = 3;

/// Divergence class of one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenClass {
    Normal,
    /// High loss where the model is confident: `z_l > 0.6 & z_H < -0.6`.
    LabelError,
    /// High loss and high entropy: `z_l > 0.6 & z_H > 0.6`.
    Hard,
    /// Low loss despite high entropy: `z_l < -0.6 & z_H > 0.6`.
    Lucky,
    /// Above-mean raw loss and `z_H < -1`.
    SuspiciousCertainty,
}

impl TokenClass {
    pub const ALL: [TokenClass; 5] = [
        TokenClass::Normal,
        TokenClass::LabelError,
        TokenClass::Hard,
        TokenClass::Lucky,
        TokenClass::SuspiciousCertainty,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TokenClass::Normal => "normal",
            TokenClass::LabelError => "label_error",
            TokenClass::Hard => "hard",
            TokenClass::Lucky => "lucky",
            TokenClass::SuspiciousCertainty => "suspicious_certainty",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A run of non-normal tokens, `[start, end)` in answer-token positions.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    /// The most frequent class in the run (ties: the earlier class in [`TokenClass::ALL`]).
    pub class: TokenClass,
    /// Largest `|d_t|` in the run.
    pub max_abs_d: f64,
    /// Mean raw loss over the run.
    pub mean_loss: f64,
}

/// The divergence analysis of one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Divergence {
    pub z_loss: Vec<f64>,
    pub z_entropy: Vec<f64>,
    pub d: Vec<f64>,
    pub classes: Vec<TokenClass>,
    /// `sum over non-normal |d_t| / n`.
    pub score: f64,
    pub spans: Vec<Span>,
}

/// Everything `sort` reports about one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    pub n: usize,
    pub mean_loss: f64,
    pub mean_entropy: f64,
    /// `filtered` score and its two counts.
    pub filtered: f64,
    pub confident_wrong: usize,
    pub uncertain_wrong: usize,
    /// Pearson(H, l) when defined.
    pub pearson: Option<f64>,
    /// Tokens per class, in [`TokenClass::ALL`] order.
    pub class_counts: [usize; 5],
    pub divergence: f64,
    pub spans: Vec<Span>,
    /// Instruction-following difficulty, when the prompt-free pass was run ([`ifd`]).
    pub ifd: Option<f64>,
    /// Mean loss of the answer tokens with the prompt emptied (the denominator's pass).
    pub mean_loss_without_prompt: Option<f64>,
    /// Why the sample is degenerate (no / too few answer tokens, a constant series, non-finite values).
    pub degenerate: Option<String>,
}

impl Analysis {
    /// The ranking score of `mode`: always finite; 0 for a sample the mode cannot judge.
    pub fn score(&self, mode: QualityMode) -> f64 {
        match mode {
            QualityMode::Filtered => self.filtered,
            QualityMode::Similarity => self.pearson.map(|r| -r).unwrap_or(0.0),
            QualityMode::Divergence => self.divergence,
            QualityMode::Ifd => self.ifd.unwrap_or(0.0),
        }
    }

    /// Adds the `ifd` score from the answer's losses with the prompt emptied (`None`: the record has no prompt).
    pub fn set_prompt_free(&mut self, cond: &[f32], free: Option<&[f32]>) {
        let Some(free) = free else { return };
        self.ifd = ifd(cond, free);
        let n = cond.len().min(free.len());
        self.mean_loss_without_prompt = (n > 0).then(|| mean_f32(&free[..n]));
    }

    /// Why the score of `mode` is a default or less meaningful than usual; `None` for a normal sample.
    pub fn reason(&self, mode: QualityMode) -> Option<String> {
        if let Some(r) = &self.degenerate {
            return Some(r.clone());
        }
        if mode == QualityMode::Similarity && self.pearson.is_none() {
            return Some("correlation undefined".into());
        }
        if mode == QualityMode::Ifd && self.ifd.is_none() {
            return Some(
                "no prompt to condition the answer on (or no answer token in the prompt-free pass): ifd scored 0"
                    .into(),
            );
        }
        None
    }
}

/// Mean of a series (0 for an empty one).
pub fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        0.0
    } else {
        x.iter().sum::<f64>() / x.len() as f64
    }
}

fn mean_f32(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64).sum::<f64>() / x.len().max(1) as f64
}

/// Instruction-following difficulty: `exp(mean(cond) - mean(free))` over the first `min(len)` answer tokens,
/// i.e. PPL(answer | prompt) / PPL(answer | emptied prompt). `None` without a common token or for non-finite
/// losses.
pub fn ifd(cond: &[f32], free: &[f32]) -> Option<f64> {
    let n = cond.len().min(free.len());
    if n == 0 {
        return None;
    }
    let r = (mean_f32(&cond[..n]) - mean_f32(&free[..n])).exp();
    r.is_finite().then_some(r)
}

/// Population standard deviation.
fn std_dev(x: &[f64]) -> f64 {
    let m = mean(x);
    (x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / x.len().max(1) as f64).sqrt()
}

/// Relative spread below which a series counts as constant.
fn is_constant(x: &[f64]) -> bool {
    let m = mean(x);
    std_dev(x) <= 1e-9 * m.abs().max(1.0)
}

/// Centred rolling mean with window 3; the first and last value average the two values they have.
pub fn rolling_mean3(x: &[f64]) -> Vec<f64> {
    let n = x.len();
    (0..n)
        .map(|i| {
            let lo = i.saturating_sub(1);
            let hi = (i + 1).min(n - 1);
            mean(&x[lo..=hi])
        })
        .collect()
}

/// z-scores within the series (population std); a constant series gives all zeros.
pub fn zscore(x: &[f64]) -> Vec<f64> {
    if x.is_empty() || is_constant(x) {
        return vec![0.0; x.len()];
    }
    let (m, s) = (mean(x), std_dev(x));
    x.iter().map(|v| (v - m) / s).collect()
}

/// Pearson correlation; `None` for fewer than [`MIN_TOKENS`] values or a constant series.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() || x.len() < MIN_TOKENS || is_constant(x) || is_constant(y) {
        return None;
    }
    let (mx, my) = (mean(x), mean(y));
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    let r = sxy / (sxx * syy).sqrt();
    r.is_finite().then(|| r.clamp(-1.0, 1.0))
}

/// `filtered` score: (score, confidently wrong tokens, uncertain wrong tokens).
pub fn filtered(loss: &[f64], entropy: &[f64]) -> (f64, usize, usize) {
    let (mut confident, mut uncertain) = (0, 0);
    for (&l, &h) in loss.iter().zip(entropy) {
        if l > FILTERED_LOSS {
            if h <= FILTERED_ENTROPY {
                confident += 1;
            } else {
                uncertain += 1;
            }
        }
    }
    (
        confident as f64 + 0.5 * uncertain as f64,
        confident,
        uncertain,
    )
}

/// The class of one token from its z-scores and raw loss.
pub fn classify(z_l: f64, z_h: f64, loss: f64, mean_loss: f64) -> TokenClass {
    if z_l > Z_CLASS && z_h < -Z_CLASS {
        TokenClass::LabelError
    } else if z_l > Z_CLASS && z_h > Z_CLASS {
        TokenClass::Hard
    } else if z_l < -Z_CLASS && z_h > Z_CLASS {
        TokenClass::Lucky
    } else if loss > mean_loss && z_h < Z_CERTAIN {
        TokenClass::SuspiciousCertainty
    } else {
        TokenClass::Normal
    }
}

/// The divergence analysis (see the module docs).
pub fn divergence(loss: &[f64], entropy: &[f64]) -> Divergence {
    let n = loss.len().min(entropy.len());
    let (loss, entropy) = (&loss[..n], &entropy[..n]);
    if n == 0 {
        return Divergence {
            z_loss: vec![],
            z_entropy: vec![],
            d: vec![],
            classes: vec![],
            score: 0.0,
            spans: vec![],
        };
    }
    let z_loss = zscore(&rolling_mean3(loss));
    let z_entropy = zscore(&rolling_mean3(entropy));
    let d: Vec<f64> = z_loss.iter().zip(&z_entropy).map(|(a, b)| a - b).collect();
    let ml = mean(loss);
    let classes: Vec<TokenClass> = (0..n)
        .map(|t| classify(z_loss[t], z_entropy[t], loss[t], ml))
        .collect();
    let score = (0..n)
        .filter(|&t| classes[t] != TokenClass::Normal)
        .map(|t| d[t].abs())
        .sum::<f64>()
        / n as f64;
    let mut spans = Vec::new();
    let mut t = 0;
    while t < n {
        if classes[t] == TokenClass::Normal {
            t += 1;
            continue;
        }
        let start = t;
        while t < n && classes[t] != TokenClass::Normal {
            t += 1;
        }
        let max_abs_d = d[start..t].iter().fold(0.0f64, |m, v| m.max(v.abs()));
        if max_abs_d >= SPAN_D {
            let mut counts = [0usize; 5];
            for c in &classes[start..t] {
                counts[c.index()] += 1;
            }
            let class = TokenClass::ALL
                .into_iter()
                .max_by(|a, b| {
                    counts[a.index()]
                        .cmp(&counts[b.index()])
                        .then(b.index().cmp(&a.index()))
                })
                .unwrap_or(TokenClass::Normal);
            spans.push(Span {
                start,
                end: t,
                class,
                max_abs_d,
                mean_loss: mean(&loss[start..t]),
            });
        }
    }
    Divergence {
        z_loss,
        z_entropy,
        d,
        classes,
        score,
        spans,
    }
}

/// Every score of one sample from its aligned answer-token series (`loss[t]`, `entropy[t]` of target t).
pub fn analyze(loss: &[f32], entropy: &[f32]) -> Analysis {
    let n = loss.len().min(entropy.len());
    let l: Vec<f64> = loss[..n].iter().map(|&v| v as f64).collect();
    let h: Vec<f64> = entropy[..n].iter().map(|&v| v as f64).collect();
    let empty = |reason: String| Analysis {
        n,
        mean_loss: 0.0,
        mean_entropy: 0.0,
        filtered: 0.0,
        confident_wrong: 0,
        uncertain_wrong: 0,
        pearson: None,
        class_counts: [n, 0, 0, 0, 0],
        divergence: 0.0,
        spans: vec![],
        ifd: None,
        mean_loss_without_prompt: None,
        degenerate: Some(reason),
    };
    if n == 0 {
        return empty("no answer tokens".into());
    }
    if l.iter().chain(&h).any(|v| !v.is_finite()) {
        return empty("non-finite loss or entropy".into());
    }
    let (filtered, confident_wrong, uncertain_wrong) = filtered(&l, &h);
    let mut a = Analysis {
        n,
        mean_loss: mean(&l),
        mean_entropy: mean(&h),
        filtered,
        confident_wrong,
        uncertain_wrong,
        pearson: pearson(&h, &l),
        class_counts: [n, 0, 0, 0, 0],
        divergence: 0.0,
        spans: vec![],
        ifd: None,
        mean_loss_without_prompt: None,
        degenerate: None,
    };
    if n < MIN_TOKENS {
        a.degenerate = Some(format!(
            "answer shorter than {MIN_TOKENS} tokens ({n}): similarity and divergence are undefined, scored 0"
        ));
        return a;
    }
    let dv = divergence(&l, &h);
    a.class_counts = [0; 5];
    for c in &dv.classes {
        a.class_counts[c.index()] += 1;
    }
    a.divergence = dv.score;
    a.spans = dv.spans;
    let (cl, ch) = (is_constant(&l), is_constant(&h));
    if cl || ch {
        let which = match (cl, ch) {
            (true, true) => "loss and entropy series are",
            (true, false) => "loss series is",
            _ => "entropy series is",
        };
        a.degenerate = Some(format!(
            "the {which} constant: similarity is undefined (scored 0), its z-scores are 0"
        ));
    }
    a
}

/// Reference alignment, for tests and documentation: `log_probs[p]` is the log-distribution computed at
/// position p (it predicts token p + 1); `targets[t]` marks token t as supervised. Returns, per supervised
/// token t in order, its loss `-log_probs[t-1][ids[t]]` and the entropy of that same row `t - 1`.
pub fn series_from_log_probs(
    log_probs: &[Vec<f32>],
    ids: &[u32],
    targets: &[bool],
) -> (Vec<f32>, Vec<f32>) {
    let mut loss = Vec::new();
    let mut ent = Vec::new();
    for t in 1..ids.len().min(targets.len()) {
        if !targets[t] {
            continue;
        }
        let Some(row) = log_probs.get(t - 1) else {
            break;
        };
        let Some(&lp) = row.get(ids[t] as usize) else {
            continue;
        };
        loss.push(-lp);
        ent.push(-row.iter().map(|&v| v.exp() * v).sum::<f32>());
    }
    (loss, ent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn ifd_is_the_perplexity_ratio_over_common_tokens() {
        // mean(cond) = 2, mean(free[..3]) = 3: exp(-1); the fourth free token has no partner and is ignored.
        let r = ifd(&[1.0, 2.0, 3.0], &[2.0, 3.0, 4.0, 100.0]).unwrap();
        assert!(close(r, (-1.0f64).exp()), "{r}");
        assert_eq!(ifd(&[], &[1.0]), None);
        assert_eq!(ifd(&[f32::NAN], &[1.0]), None);
        let mut a = analyze(&[1.0, 2.0, 3.0], &[0.5, 0.5, 0.6]);
        assert_eq!(a.score(QualityMode::Ifd), 0.0);
        assert!(a.reason(QualityMode::Ifd).unwrap().contains("no prompt"));
        a.set_prompt_free(&[1.0, 2.0, 3.0], Some(&[1.0, 2.0, 3.0]));
        assert!(close(a.score(QualityMode::Ifd), 1.0));
        assert_eq!(a.mean_loss_without_prompt, Some(2.0));
        assert_eq!(a.reason(QualityMode::Ifd), None);
        assert_eq!("ifd".parse::<QualityMode>(), Ok(QualityMode::Ifd));
        assert_eq!(
            "loss".parse::<QualityMode>().unwrap_err(),
            "unknown mode `loss`: expected filtered, similarity, divergence or ifd"
        );
    }

    #[test]
    fn filtered_counts_confident_wrong_double() {
        // l:  4 (H 0.5: confident wrong = 1), 5 (H 2: uncertain = 0.5), 1 (ignored), 3 (not > 3), 3.5 (H 1: <= 1 -> 1)
        let l = [4.0, 5.0, 1.0, 3.0, 3.5];
        let h = [0.5, 2.0, 0.1, 0.1, 1.0];
        assert_eq!(filtered(&l, &h), (2.5, 2, 1));
        let a = analyze(&l.map(|v| v as f32), &h.map(|v| v as f32));
        assert!(close(a.score(QualityMode::Filtered), 2.5));
    }

    #[test]
    fn similarity_is_minus_pearson() {
        // H = [1,2,3,4], l = [4,3,2,1]: Pearson = -1 -> score 1 (loss high where the model is confident).
        let a = analyze(&[4.0, 3.0, 2.0, 1.0], &[1.0, 2.0, 3.0, 4.0]);
        assert!(close(a.score(QualityMode::Similarity), 1.0));
        // Hand-computed: H = [1,2,3], l = [1,3,2]: mean 2 each, sxy = (-1)(-1)+0+1*0 = 1, sxx = 2, syy = 2 -> r = 0.5.
        let a = analyze(&[1.0, 3.0, 2.0], &[1.0, 2.0, 3.0]);
        assert!((a.score(QualityMode::Similarity) + 0.5).abs() < 1e-6);
        assert!(a.reason(QualityMode::Similarity).is_none());
    }

    #[test]
    fn degenerate_samples_get_finite_scores_and_reasons() {
        for mode in [
            QualityMode::Filtered,
            QualityMode::Similarity,
            QualityMode::Divergence,
        ] {
            let empty = analyze(&[], &[]);
            assert_eq!(empty.score(mode), 0.0);
            assert!(empty.reason(mode).unwrap().contains("no answer tokens"));
            let short = analyze(&[5.0, 6.0], &[0.1, 0.2]);
            assert!(short.score(mode).is_finite());
            assert!(short.reason(mode).unwrap().contains("shorter than 3"));
            let constant = analyze(&[2.0; 6], &[0.5, 1.0, 1.5, 2.0, 2.5, 3.0]);
            assert!(constant.score(mode).is_finite());
            assert!(constant.reason(mode).unwrap().contains("loss series"));
            let nan = analyze(&[1.0, f32::NAN, 2.0], &[1.0, 1.0, 1.0]);
            assert_eq!(nan.score(mode), 0.0);
            assert!(nan.reason(mode).unwrap().contains("non-finite"));
        }
        // The short sample still has its filtered score.
        assert_eq!(analyze(&[5.0, 6.0], &[0.1, 0.2]).filtered, 2.0);
        // Constant entropy: z(H) = 0, so nothing is classed by entropy; the score stays finite.
        let a = analyze(&[1.0, 1.0, 9.0, 1.0, 1.0], &[2.0; 5]);
        assert_eq!(a.score(QualityMode::Similarity), 0.0);
        assert!(a.score(QualityMode::Divergence).is_finite());
    }

    #[test]
    fn rolling_mean_and_zscore_by_hand() {
        let r = rolling_mean3(&[1.0, 2.0, 6.0, 3.0]);
        // edges average two values: (1+2)/2, (1+2+6)/3, (2+6+3)/3, (6+3)/2
        let want = [1.5, 3.0, 11.0 / 3.0, 4.5];
        for (a, b) in r.iter().zip(want) {
            assert!(close(*a, b), "{r:?}");
        }
        assert_eq!(rolling_mean3(&[7.0]), vec![7.0]);
        // population std of [1, 3] = 1 -> z = [-1, 1]
        assert_eq!(zscore(&[1.0, 3.0]), vec![-1.0, 1.0]);
        assert_eq!(zscore(&[4.0, 4.0, 4.0]), vec![0.0; 3]);
    }

    #[test]
    fn divergence_by_hand() {
        // Seven tokens; a confidently-wrong burst at positions 3 (high loss, low entropy).
        let l = [1.0, 1.0, 1.0, 10.0, 1.0, 1.0, 1.0];
        let h = [2.0, 2.0, 2.0, 0.0, 2.0, 2.0, 2.0];
        // smoothed l: [1, 1, 4, 4, 4, 1, 1]; mean 16/7; smoothed H: [2, 2, 4/3, 4/3, 4/3, 2, 2]
        let sl = rolling_mean3(&l);
        assert_eq!(sl, vec![1.0, 1.0, 4.0, 4.0, 4.0, 1.0, 1.0]);
        let m: f64 = 16.0 / 7.0;
        let var = (4.0 * (1.0 - m).powi(2) + 3.0 * (4.0 - m).powi(2)) / 7.0;
        let z_hi = (4.0 - m) / var.sqrt();
        let z_lo = (1.0 - m) / var.sqrt();
        let dv = divergence(&l, &h);
        assert!(close(dv.z_loss[3], z_hi) && close(dv.z_loss[0], z_lo));
        // The entropy z mirrors the loss z exactly (same shape, inverted), so d = 2 z(l).
        for t in 0..7 {
            assert!(close(dv.z_entropy[t], -dv.z_loss[t]));
            assert!(close(dv.d[t], 2.0 * dv.z_loss[t]));
        }
        // z_hi = 1.1547 > 0.6 and z(H) = -1.1547 < -0.6 -> label errors at 2..5; the rest: z_l = -0.866 < -0.6
        // but z_H = 0.866 > 0.6 -> "lucky".
        assert!(close(z_hi, 2.0 / 3f64.sqrt()));
        use TokenClass::*;
        assert_eq!(
            dv.classes,
            vec![
                Lucky, Lucky, LabelError, LabelError, LabelError, Lucky, Lucky
            ]
        );
        // score = sum |d| / n = (3 * 2 z_hi + 4 * 2 |z_lo|) / 7
        let want = (3.0 * 2.0 * z_hi + 4.0 * 2.0 * z_lo.abs()) / 7.0;
        assert!(close(dv.score, want), "{} vs {want}", dv.score);
        // One run of non-normal tokens (all 7); max |d| = 2.309 >= 1.96 -> one span, dominated by lucky (4 of 7).
        assert_eq!(dv.spans.len(), 1);
        assert_eq!((dv.spans[0].start, dv.spans[0].end), (0, 7));
        assert_eq!(dv.spans[0].class, Lucky);
        assert!(close(dv.spans[0].max_abs_d, 2.0 * z_hi));
    }

    #[test]
    fn divergence_spans_need_a_large_d() {
        // A gentle ramp: non-normal tokens exist, but no |d| reaches 1.96 -> no span.
        let l = [1.0, 1.2, 1.4, 1.6, 1.8, 2.0];
        let h = [1.0, 1.0, 1.0, 1.0, 1.0, 1.1];
        let dv = divergence(&l, &h);
        assert!(dv.d.iter().all(|v| v.abs() < SPAN_D));
        assert!(dv.spans.is_empty());
        assert!(dv.classes.iter().any(|&c| c != TokenClass::Normal));
    }

    #[test]
    fn suspicious_certainty_uses_raw_loss_and_z_entropy() {
        assert_eq!(
            classify(0.5, -1.5, 3.0, 2.0),
            TokenClass::SuspiciousCertainty
        );
        assert_eq!(classify(0.5, -1.5, 1.0, 2.0), TokenClass::Normal);
        assert_eq!(classify(0.7, -0.7, 0.0, 2.0), TokenClass::LabelError);
        assert_eq!(classify(0.7, 0.7, 0.0, 2.0), TokenClass::Hard);
        assert_eq!(classify(-0.7, 0.7, 0.0, 2.0), TokenClass::Lucky);
    }

    #[test]
    fn entropy_is_that_of_the_distribution_predicting_the_target() {
        // ids = [0, 1, 2]; tokens 1 and 2 are targets. Row 0 predicts token 1, row 1 predicts token 2, row 2
        // (after the last token) predicts nothing.
        let ln = |p: f32| p.ln();
        let rows = vec![
            vec![ln(0.25), ln(0.25), ln(0.25), ln(0.25)], // uniform: H = ln 4
            vec![ln(0.97), ln(0.01), ln(0.01), ln(0.01)], // peaked
            vec![ln(0.5), ln(0.5), ln(1e-9), ln(1e-9)],
        ];
        let (loss, ent) = series_from_log_probs(&rows, &[0, 1, 2], &[false, true, true]);
        assert_eq!(loss.len(), 2);
        assert!((loss[0] - 4f32.ln()).abs() < 1e-6); // -ln 0.25 from row 0
        assert!((loss[1] - 100f32.ln()).abs() < 1e-5); // -ln 0.01 from row 1
        assert!((ent[0] - 4f32.ln()).abs() < 1e-6); // H of row 0, not row 1
        let h1 = -(0.97 * 0.97f32.ln() + 3.0 * 0.01 * 0.01f32.ln());
        assert!((ent[1] - h1).abs() < 1e-5);
        // The original's off-by-one would have paired loss[0] with H(row 1) -> a different score.
        let aligned = analyze(&[1.0, 5.0, 1.0], &[ent[0], ent[1], ent[0]]);
        let shifted = analyze(&[1.0, 5.0, 1.0], &[ent[1], ent[0], ent[1]]);
        assert!(aligned.score(QualityMode::Similarity) > 0.0);
        assert!(shifted.score(QualityMode::Similarity) < 0.0);
    }
}
