//! `clawgress nft apply|status|check|rollback` (§8): the `nft` section of
//! this node's config turned into kernel rules. Needs root (CAP_NET_ADMIN).

use std::path::Path;

use anyhow::{Context, Result};
use clawgress_nft::{Inputs, Mode, Nft};
use clawgress_policy::config::NftMode;
use clawgress_policy::Document;

fn mode_of(m: NftMode) -> Mode {
    match m {
        NftMode::Sovereign => Mode::Sovereign,
        NftMode::ProxyOnly => Mode::ProxyOnly,
        NftMode::Connected => Mode::Connected,
    }
}

/// The ruleset inputs from the config (`mode` overrides `nft.mode`).
pub fn inputs(doc: &Document, mode: Option<Mode>, log: bool) -> Result<Inputs> {
    let passwd = Path::new("/etc/passwd");
    let n = &doc.nft;
    let mode = mode.unwrap_or(mode_of(n.mode));
    let envoy_uid = match mode {
        Mode::Connected => 0,
        _ => clawgress_nft::uid_of(&n.envoy_user, passwd)
            .with_context(|| format!("nft.envoy_user {:?}", n.envoy_user))?,
    };
    let exempt_uids = n
        .exempt_users
        .iter()
        .map(|u| {
            clawgress_nft::uid_of(u, passwd).with_context(|| format!("nft.exempt_users {u:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut allowed_private = n.allowed_private.clone();
    allowed_private.extend(doc.gateway.private_destinations_allowed.iter().copied());
    Ok(Inputs {
        mode,
        envoy_uid,
        exempt_uids,
        protected_sources: n.protected_sources.clone(),
        allowed_private,
        guarded: clawgress_policy::destination::guarded_ranges(),
        log,
        transparent_port: doc.gateway.transparent_listen.map(|a| a.port()),
        admin_port: Some(doc.gateway.admin_listen.port()),
        admin_sources: n.admin_sources.clone(),
    })
}

pub fn parse_mode(s: &str) -> Result<Mode> {
    match s {
        "sovereign" => Ok(Mode::Sovereign),
        "proxy-only" => Ok(Mode::ProxyOnly),
        "connected" => Ok(Mode::Connected),
        other => anyhow::bail!("mode {other:?}: one of sovereign, proxy-only, connected"),
    }
}

pub fn apply(
    doc: &Document,
    dir: &Path,
    mode: Option<Mode>,
    log: bool,
    dry_run: bool,
) -> Result<()> {
    let i = inputs(doc, mode, log)?;
    let rules = clawgress_nft::render(&i);
    clawgress_nft::typed(&rules)?;
    if dry_run {
        println!("{}", serde_json::to_string_pretty(&rules)?);
        return Ok(());
    }
    let st = Nft::new(dir.to_path_buf()).apply(&i)?;
    println!(
        "{} applied at {} (ruleset sha256 {})",
        st.mode.as_str(),
        st.applied_at,
        if st.ruleset_sha256.is_empty() {
            "-"
        } else {
            &st.ruleset_sha256[..16]
        }
    );
    Ok(())
}

/// Exit status: true when enforced as recorded.
pub fn check(dir: &Path) -> Result<bool> {
    let (ok, why) = Nft::new(dir.to_path_buf()).check()?;
    println!("{why}");
    Ok(ok)
}

pub fn status(dir: &Path, json: bool) -> Result<bool> {
    let s = Nft::new(dir.to_path_buf()).status()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!(
            "mode {}  applied {}  enforced {}  dropped {} packets / {} bytes",
            s.mode.map(|m| m.as_str()).unwrap_or("-"),
            s.applied_at.as_deref().unwrap_or("-"),
            s.enforced,
            s.dropped_packets,
            s.dropped_bytes
        );
        for r in &s.rules {
            println!(
                "  {:<10} {:<8} {:>10} packets {:>12} bytes  {}",
                r.chain, r.verdict, r.packets, r.bytes, r.comment
            );
        }
    }
    Ok(s.enforced)
}

pub fn rollback(dir: &Path, to: usize) -> Result<()> {
    let st = Nft::new(dir.to_path_buf()).rollback(to)?;
    println!("rolled back: {} as of {}", st.mode.as_str(), st.applied_at);
    Ok(())
}
