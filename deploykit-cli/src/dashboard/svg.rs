//! Charts drawn on the server as SVG: they need no script, no library and
//! no network, and read the same with JavaScript off.

use std::fmt::Write;

use super::page::esc;

const W: f64 = 640.0;
const H: f64 = 180.0;
/// Room for the axis labels.
const LEFT: f64 = 44.0;
const BOTTOM: f64 = 24.0;
const TOP: f64 = 10.0;
const RIGHT: f64 = 10.0;

fn frame(title: &str, body: &str) -> String {
    format!(
        "<svg class=\"chart\" role=\"img\" aria-label=\"{t}\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" xmlns=\"http://www.w3.org/2000/svg\"><title>{t}</title>{body}</svg>",
        t = esc(title)
    )
}

fn axes(out: &mut String, y_labels: &[(f64, String)], x_label: &str) {
    let _ = write!(
        out,
        "<line class=\"axis\" x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{y0}\"/><line class=\"axis\" x1=\"{LEFT}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\"/>",
        y0 = H - BOTTOM,
        x1 = W - RIGHT
    );
    for (y, label) in y_labels {
        let _ = write!(
            out,
            "<text class=\"tick\" x=\"{x}\" y=\"{ty:.1}\" text-anchor=\"end\">{l}</text><line class=\"grid\" x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{x1}\" y2=\"{y:.1}\"/>",
            x = LEFT - 4.0,
            ty = y + 4.0,
            l = esc(label),
            x1 = W - RIGHT
        );
    }
    let _ = write!(
        out,
        "<text class=\"tick\" x=\"{x}\" y=\"{y}\" text-anchor=\"end\">{l}</text>",
        x = W - RIGHT,
        y = H - 6.0,
        l = esc(x_label)
    );
}

/// The canary's share of traffic over the run: a step line from 0 to
/// `end_ms`, 0 to 100 %.
pub(crate) fn weight_chart(points: &[(u64, u8)], end_ms: u64) -> String {
    let end = end_ms.max(points.last().map_or(1, |p| p.0)).max(1) as f64;
    let x = |ms: u64| LEFT + (ms as f64 / end) * (W - LEFT - RIGHT);
    let y = |w: u8| H - BOTTOM - f64::from(w) / 100.0 * (H - BOTTOM - TOP);
    let mut out = String::new();
    let ticks: Vec<(f64, String)> = [0u8, 50, 100].iter().map(|w| (y(*w), format!("{w} %"))).collect();
    axes(&mut out, &ticks, &format!("{:.1} s", end / 1000.0));
    let mut d = format!("M{:.1},{:.1}", x(0), y(0));
    let mut last = 0u8;
    for (ms, w) in points {
        let _ = write!(d, " H{:.1} V{:.1}", x(*ms), y(*w));
        last = *w;
    }
    let _ = write!(d, " H{:.1}", x(end as u64));
    let _ = write!(
        out,
        "<path class=\"weight\" d=\"{d}\"/><text class=\"value\" x=\"{tx:.1}\" y=\"{ty:.1}\">{last} %</text>",
        tx = W - RIGHT - 40.0,
        ty = (y(last) - 4.0).max(TOP + 10.0)
    );
    frame("Canary weight over time", &out)
}

/// What a check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Every rule held.
    Pass,
    /// A rule was broken.
    Fail,
    /// Neither (no data, provider error).
    Inconclusive,
}

/// One analysis check on the chart.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CheckPoint {
    /// When, milliseconds since the start.
    pub(crate) at_ms: u64,
    /// What the check decided (the point's colour).
    pub(crate) verdict: Verdict,
    /// The measured value ÷ its threshold (the rule closest to its limit),
    /// when measured.
    pub(crate) ratio: Option<f64>,
}

/// Each check against its threshold: the threshold is the line at 1.0;
/// each check sits at its value ÷ threshold (a broken rule above the line,
/// a pass below it), or, unmeasured, a pass half-way and the rest at 0.
pub(crate) fn checks_chart(checks: &[CheckPoint], end_ms: u64) -> String {
    let end = end_ms.max(1) as f64;
    let top = checks
        .iter()
        .filter_map(|c| c.ratio)
        .fold(2.0f64, f64::max)
        .min(100.0);
    let x = |ms: u64| LEFT + (ms as f64 / end) * (W - LEFT - RIGHT);
    let y = |r: f64| H - BOTTOM - (r / top).min(1.0) * (H - BOTTOM - TOP);
    let mut out = String::new();
    let ticks = vec![
        (y(0.0), "0".to_string()),
        (y(1.0), "limit".to_string()),
        (y(top), format!("{top:.1}x")),
    ];
    axes(&mut out, &ticks, &format!("{:.1} s", end / 1000.0));
    let _ = write!(
        out,
        "<line class=\"threshold\" x1=\"{LEFT}\" y1=\"{t:.1}\" x2=\"{x1}\" y2=\"{t:.1}\"/>",
        t = y(1.0),
        x1 = W - RIGHT
    );
    for c in checks {
        let (class, word, unmeasured) = match c.verdict {
            Verdict::Pass => ("pass", "pass", 0.5),
            Verdict::Fail => ("fail", "fail", top),
            Verdict::Inconclusive => ("nodata", "inconclusive", 0.0),
        };
        let _ = write!(
            out,
            "<circle class=\"{class}\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\"><title>{}</title></circle>",
            x(c.at_ms),
            y(c.ratio.unwrap_or(unmeasured)),
            match c.ratio {
                Some(r) => format!("{word}: {r:.2}x the threshold"),
                None => word.into(),
            }
        );
    }
    frame("Analysis checks against their thresholds", &out)
}

/// One bar of [`bars`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Bar {
    /// Shown under the bar's tooltip.
    pub(crate) label: String,
    /// Its height.
    pub(crate) value: f64,
    /// The CSS class (the outcome).
    pub(crate) class: &'static str,
}

/// Bars from left to right, scaled to the largest; `unit` labels the axis.
pub(crate) fn bars(title: &str, items: &[Bar], unit: &str) -> String {
    let top = items.iter().map(|b| b.value).fold(0.0f64, f64::max).max(1e-9);
    let n = items.len().max(1) as f64;
    let slot = (W - LEFT - RIGHT) / n;
    let mut out = String::new();
    let y = |v: f64| H - BOTTOM - v / top * (H - BOTTOM - TOP);
    let top_label = match top {
        t if t >= 10.0 || unit.is_empty() => format!("{t:.0} {unit}"),
        t if t >= 1.0 => format!("{t:.1} {unit}"),
        t => format!("{t:.2} {unit}"),
    };
    let top_label = top_label.trim_end().to_owned();
    let ticks = vec![(y(0.0), "0".into()), (y(top), top_label)];
    axes(&mut out, &ticks, "");
    // A lone bar stays a bar, not a wall.
    let width = (slot * 0.7).clamp(1.0, 36.0);
    for (i, b) in items.iter().enumerate() {
        let h = (H - BOTTOM) - y(b.value);
        let _ = write!(
            out,
            "<rect class=\"{}\" x=\"{:.1}\" y=\"{:.1}\" width=\"{width:.1}\" height=\"{:.1}\"><title>{}</title></rect>",
            b.class,
            LEFT + i as f64 * slot + (slot - width) / 2.0,
            y(b.value),
            h.max(0.5),
            esc(&b.label)
        );
    }
    frame(title, &out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_weight_line_ends_at_the_last_weight() {
        let svg = weight_chart(&[(0, 20), (1000, 50)], 2000);
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains(">50 %</text>"), "{svg}");
        // 50 % sits half-way up the plot area.
        let mid = H - BOTTOM - 0.5 * (H - BOTTOM - TOP);
        assert!(svg.contains(&format!("V{mid:.1}")), "{svg}");
    }

    #[test]
    fn a_failed_check_rises_above_the_threshold_line_a_pass_stays_below() {
        let svg = checks_chart(
            &[
                CheckPoint {
                    at_ms: 0,
                    verdict: Verdict::Pass,
                    ratio: None,
                },
                CheckPoint {
                    at_ms: 500,
                    verdict: Verdict::Fail,
                    ratio: Some(4.0),
                },
            ],
            1000,
        );
        let cy = |class: &str| -> f64 {
            let at = svg.find(&format!("class=\"{class}\"")).unwrap();
            let rest = &svg[at..];
            let v = rest.split("cy=\"").nth(1).unwrap();
            v[..v.find('"').unwrap()].parse().unwrap()
        };
        let line: f64 = {
            let at = svg.find("class=\"threshold\"").unwrap();
            let v = svg[at..].split("y1=\"").nth(1).unwrap();
            v[..v.find('"').unwrap()].parse().unwrap()
        };
        // SVG's y grows downwards.
        assert!(cy("fail") < line, "{svg}");
        assert!(cy("pass") > line, "{svg}");
    }

    #[test]
    fn a_measured_pass_sits_at_its_ratio_below_the_line() {
        let svg = checks_chart(
            &[CheckPoint {
                at_ms: 0,
                verdict: Verdict::Pass,
                ratio: Some(0.8),
            }],
            1000,
        );
        // The scale tops out at 2x the threshold.
        let want = H - BOTTOM - 0.4 * (H - BOTTOM - TOP);
        assert!(svg.contains(&format!("cy=\"{want:.1}\"")), "{svg}");
        assert!(svg.contains("pass: 0.80x the threshold"), "{svg}");
    }

    #[test]
    fn labels_are_escaped() {
        let svg = bars(
            "t",
            &[Bar {
                label: "<script>".into(),
                value: 1.0,
                class: "ok",
            }],
            "s",
        );
        assert!(!svg.contains("<script>"), "{svg}");
        assert!(svg.contains("&lt;script&gt;"));
    }
}
