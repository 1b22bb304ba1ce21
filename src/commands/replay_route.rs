//! `moellava replay-route`: compare expert-cache policies on a route trace, in seconds, without a model.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use moellava_runtime::experts::replay::{replay, slots_for, ReplayOptions, ReplayReport};
use moellava_runtime::experts::{trace, Policy};

/// Simulate the expert cache over a route trace (from `--route-trace` on run, chat, bench or pope).
///
/// The simulator takes the same decisions as the real cache (the same slot table, in the same order),
/// so with the run's slot count, policy and --prefetch it reproduces the run's hits, misses, prefetch
/// hits, wasted prefetches and bytes loaded exactly. Time is modelled: one loader reading at
/// --bw-load, the compute reading each expert at --bw-compute, prefetches overlapping the current
/// layer's compute. Several budgets and policies give one row each.
///
/// A run with `--expert-ram B` has ⌊B / slot_bytes⌋ slots (both are in the trace header and in
/// `run --json`); `--expert-ram P%` and `--budget P%` both mean ⌊P% × all experts⌋ slots.
///
/// Examples:
///   moellava run -m m.gguf --image x.png -p "Describe it." --route-trace t.jsonl
///   moellava replay-route t.jsonl --budget 25%,50%,75% --policy lru,lfu,least-stale,belady
///   moellava replay-route t.jsonl --budget 8 --policy least-stale --prefetch --json
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct ReplayRouteArgs {
    /// The route trace (JSON lines, header first).
    #[arg(value_name = "FILE.jsonl")]
    pub trace: PathBuf,
    /// Cache sizes: a number of experts (slots) or a percentage of all experts; comma-separated.
    #[arg(long, default_value = "25%,50%,75%", value_delimiter = ',', value_name = "N|PERCENT")]
    pub budget: Vec<String>,
    /// Eviction policies: lru, lfu, least-stale, and belady (the offline optimum: evict the expert
    /// needed furthest ahead, which only a replay can know; the ceiling for the others); comma-separated.
    #[arg(long, default_value = "lru,lfu,least-stale,belady", value_delimiter = ',', value_name = "P")]
    pub policy: Vec<String>,
    /// Prefetch the guessed experts of the next MoE layer (as `--prefetch` on a run).
    #[arg(long)]
    pub prefetch: bool,
    /// Each row with and without prefetch.
    #[arg(long, conflicts_with = "prefetch")]
    pub both: bool,
    /// Modelled read bandwidth of the slow tier (disk, or host→GPU), GB/s.
    #[arg(long, default_value_t = 2.0, value_name = "GB/s")]
    pub bw_load: f64,
    /// Modelled bandwidth at which the compute reads an expert's weights, GB/s.
    #[arg(long, default_value_t = 10.0, value_name = "GB/s")]
    pub bw_compute: f64,
    /// One JSON object: {trace, header, runs: [{slots, policy, prefetch, hit_rate, prefetch_accuracy,
    /// guess_precision, total, layers, modelled_s, modelled_all_resident_s}]}.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: ReplayRouteArgs) -> Result<()> {
    if !(a.bw_load > 0.0 && a.bw_compute > 0.0) {
        bail!("--bw-load and --bw-compute must be > 0 GB/s");
    }
    let (header, routes) = trace::read(&a.trace)?;
    let n_total = header.moe_layers.len() * header.n_expert;
    let policies: Vec<Policy> =
        a.policy.iter().map(|p| p.parse().map_err(|e: String| anyhow::anyhow!("--policy: {e}"))).collect::<Result<_>>()?;
    let prefetch_modes: &[bool] = if a.both {
        &[false, true]
    } else if a.prefetch {
        &[true]
    } else {
        &[false]
    };
    let mut runs: Vec<(String, ReplayReport)> = Vec::new();
    for b in &a.budget {
        let slots = slots_for(b, n_total).map_err(anyhow::Error::msg)?;
        if slots < header.top_k {
            bail!("--budget {b} gives {slots} slot(s); a token needs {} (the trace's top_k)", header.top_k);
        }
        for &policy in &policies {
            for &prefetch in prefetch_modes {
                let o = ReplayOptions {
                    slots: slots.min(n_total),
                    policy,
                    prefetch,
                    bw_load: a.bw_load * 1e9,
                    bw_compute: a.bw_compute * 1e9,
                };
                runs.push((b.clone(), replay(&header, &routes, &o)));
            }
        }
    }
    if a.json {
        let out = serde_json::json!({
            "trace": a.trace,
            "header": header,
            "route_lines": routes.len(),
            "bw_load_gb_s": a.bw_load,
            "bw_compute_gb_s": a.bw_compute,
            "runs": runs.iter().map(|(b, r)| { let mut v = serde_json::to_value(r).expect("plain data"); v["budget"] = b.clone().into(); v }).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out).context("printing")?);
        return Ok(());
    }
    let calls = routes.last().map_or(0, |r| r.call + 1);
    println!(
        "{}: {} route lines, {} forward calls, {} MoE layers × {} experts of {:.2} MiB; load {} GB/s, compute {} GB/s",
        a.trace.display(),
        routes.len(),
        calls,
        header.moe_layers.len(),
        header.n_expert,
        header.expert_bytes as f64 / 1048576.0,
        a.bw_load,
        a.bw_compute
    );
    println!(
        "{:>8} {:>6} {:<12} {:>8} {:>9} {:>9} {:>9} {:>11} {:>9} {:>10}",
        "budget", "slots", "policy", "prefetch", "hit rate", "pf acc", "guess ok", "loaded MiB", "stall s", "× resident"
    );
    for (b, r) in &runs {
        println!(
            "{:>8} {:>6} {:<12} {:>8} {:>8.1}% {:>8.1}% {:>8.1}% {:>11.1} {:>9.3} {:>10.2}",
            b,
            r.slots,
            r.policy.name(),
            if r.prefetch { "on" } else { "off" },
            100.0 * r.hit_rate,
            100.0 * r.prefetch_accuracy,
            100.0 * r.guess_precision,
            r.total.bytes_loaded as f64 / 1048576.0,
            r.total.stall_s,
            r.modelled_s / r.modelled_all_resident_s.max(1e-12)
        );
    }
    Ok(())
}
