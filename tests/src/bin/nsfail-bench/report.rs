//! Figures, ratios and targets of one benchmark: summarised (median, min, max of the
//! repetitions), printed as a table, written as JSON and drawn as an SVG chart. A target is
//! reported as met or not met next to the measured ratio; it never changes the exit status.

use std::{fmt::Write as _, fs, path::Path};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use crate::chart;

/// Median, min, max (and p99) of a set of samples.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub p99: f64,
    pub n: usize,
}

pub fn summarize(samples: &[f64]) -> Summary {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return Summary {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
            p99: f64::NAN,
            n: 0,
        };
    }
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Summary {
        median,
        min: v[0],
        max: v[n - 1],
        p99: percentile(&v, 0.99),
        n,
    }
}

/// The `q` quantile of sorted samples (nearest rank).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// One measured quantity: a variant in a group (a chart panel), one sample per repetition.
#[derive(Clone, Debug)]
pub struct Figure {
    pub group: String,
    pub variant: String,
    pub unit: String,
    pub samples: Vec<f64>,
    /// Pooled trials behind a latency figure (for the p99), when there are any.
    pub pooled: Vec<f64>,
}

impl Figure {
    pub fn new(group: &str, variant: &str, unit: &str) -> Self {
        Self {
            group: group.to_owned(),
            variant: variant.to_owned(),
            unit: unit.to_owned(),
            samples: Vec::new(),
            pooled: Vec::new(),
        }
    }

    pub fn summary(&self) -> Summary {
        summarize(&self.samples)
    }
}

/// What a ratio should be.
#[derive(Clone, Copy, Debug)]
pub enum Goal {
    AtMost(f64),
    AtLeast(f64),
}

impl Goal {
    fn met(self, value: f64) -> bool {
        match self {
            Goal::AtMost(t) => value <= t,
            Goal::AtLeast(t) => value >= t,
        }
    }

    fn text(self) -> String {
        match self {
            Goal::AtMost(t) => format!("<= {t}"),
            Goal::AtLeast(t) => format!(">= {t}"),
        }
    }
}

/// A ratio computed side by side: one sample per repetition, from figures measured in that
/// same repetition.
#[derive(Clone, Debug)]
pub struct Ratio {
    pub name: String,
    pub samples: Vec<f64>,
    pub goal: Option<Goal>,
}

impl Ratio {
    /// `num / den`, repetition by repetition.
    pub fn of(name: &str, num: &Figure, den: &Figure, goal: Option<Goal>) -> Self {
        Self {
            name: name.to_owned(),
            samples: num
                .samples
                .iter()
                .zip(&den.samples)
                .map(|(a, b)| a / b)
                .collect(),
            goal,
        }
    }
}

/// A target on an absolute figure (a latency), judged on its median.
#[derive(Clone, Debug)]
pub struct Limit {
    pub name: String,
    pub value: f64,
    pub unit: String,
    pub goal: Goal,
}

pub struct Report {
    pub name: &'static str,
    pub title: String,
    pub figures: Vec<Figure>,
    pub ratios: Vec<Ratio>,
    pub limits: Vec<Limit>,
    pub method: Vec<String>,
    pub notes: Vec<String>,
    pub reps: usize,
}

impl Report {
    pub fn new(name: &'static str, title: &str, reps: usize) -> Self {
        Self {
            name,
            title: title.to_owned(),
            figures: Vec::new(),
            ratios: Vec::new(),
            limits: Vec::new(),
            method: Vec::new(),
            notes: Vec::new(),
            reps,
        }
    }

    pub fn figure(&self, group: &str, variant: &str) -> Option<&Figure> {
        self.figures
            .iter()
            .find(|f| f.group == group && f.variant == variant)
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n== {}: {} (median of {} repetitions, [min, max]) ==",
            self.name, self.title, self.reps
        );
        for line in &self.method {
            let _ = writeln!(out, "   {line}");
        }
        let gw = self
            .figures
            .iter()
            .map(|f| f.group.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let vw = self
            .figures
            .iter()
            .map(|f| f.variant.len())
            .max()
            .unwrap_or(7)
            .max(7);
        let _ = writeln!(
            out,
            "{:gw$}  {:vw$}  {:>10}  {:>10}  {:>10}  {:>10}  unit",
            "group", "variant", "median", "min", "max", "p99"
        );
        for f in &self.figures {
            let s = f.summary();
            let p99 = if f.pooled.is_empty() {
                "-".to_owned()
            } else {
                num(summarize(&f.pooled).p99)
            };
            let _ = writeln!(
                out,
                "{:gw$}  {:vw$}  {:>10}  {:>10}  {:>10}  {:>10}  {}",
                f.group,
                f.variant,
                num(s.median),
                num(s.min),
                num(s.max),
                p99,
                f.unit
            );
        }
        if !self.ratios.is_empty() || !self.limits.is_empty() {
            let nw = self
                .ratios
                .iter()
                .map(|r| r.name.len())
                .chain(self.limits.iter().map(|l| l.name.len()))
                .max()
                .unwrap_or(5);
            let _ = writeln!(
                out,
                "\n{:nw$}  {:>8}  {:>17}  {:>10}  target",
                "ratio / limit", "median", "[min, max]", "target"
            );
            for r in &self.ratios {
                let s = summarize(&r.samples);
                let (goal, met) = match r.goal {
                    Some(g) => (g.text(), verdict(g.met(s.median))),
                    None => (String::new(), String::new()),
                };
                let _ = writeln!(
                    out,
                    "{:nw$}  {:>8.2}  {:>17}  {:>10}  {}",
                    r.name,
                    s.median,
                    format!("[{:.2}, {:.2}]", s.min, s.max),
                    goal,
                    met
                );
            }
            for l in &self.limits {
                let _ = writeln!(
                    out,
                    "{:nw$}  {:>8}  {:>17}  {:>10}  {}",
                    l.name,
                    num(l.value),
                    l.unit,
                    l.goal.text(),
                    verdict(l.goal.met(l.value))
                );
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }

    pub fn json(&self) -> Value {
        let figures: Vec<Value> = self
            .figures
            .iter()
            .map(|f| {
                let s = f.summary();
                let mut v = json!({
                    "group": f.group, "variant": f.variant, "unit": f.unit,
                    "median": finite(s.median), "min": finite(s.min), "max": finite(s.max),
                    "samples": f.samples.iter().map(|x| finite(*x)).collect::<Vec<_>>(),
                });
                if !f.pooled.is_empty() {
                    let p = summarize(&f.pooled);
                    v["pooled"] = json!({
                        "n": p.n, "median": finite(p.median), "p99": finite(p.p99),
                        "min": finite(p.min), "max": finite(p.max),
                    });
                }
                v
            })
            .collect();
        let ratios: Vec<Value> = self
            .ratios
            .iter()
            .map(|r| {
                let s = summarize(&r.samples);
                json!({
                    "name": r.name, "median": finite(s.median), "min": finite(s.min),
                    "max": finite(s.max),
                    "samples": r.samples.iter().map(|x| finite(*x)).collect::<Vec<_>>(),
                    "target": r.goal.map(Goal::text),
                    "met": r.goal.map(|g| g.met(s.median)),
                })
            })
            .collect();
        let limits: Vec<Value> = self
            .limits
            .iter()
            .map(|l| {
                json!({
                    "name": l.name, "value": finite(l.value), "unit": l.unit,
                    "target": l.goal.text(), "met": l.goal.met(l.value),
                })
            })
            .collect();
        json!({
            "benchmark": self.name,
            "title": self.title,
            "repetitions": self.reps,
            "kernel": crate::sys::kernel_release(),
            "cpus": crate::sys::online_cpus(),
            "method": self.method,
            "figures": figures,
            "ratios": ratios,
            "limits": limits,
            "notes": self.notes,
        })
    }

    /// Writes `{name}.json` and `{name}.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json_path = dir.join(format!("{}.json", self.name));
        let text = serde_json::to_string_pretty(&self.json())?;
        fs::write(&json_path, text + "\n")
            .with_context(|| format!("writing {}", json_path.display()))?;
        let svg_path = dir.join(format!("{}.svg", self.name));
        chart::draw(self, &svg_path)?;
        println!("wrote {} and {}", json_path.display(), svg_path.display());
        Ok(())
    }
}

fn verdict(met: bool) -> String {
    if met { "met" } else { "NOT met" }.to_owned()
}

fn finite(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

/// A number with as many decimals as its size deserves.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        "-".to_owned()
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}
