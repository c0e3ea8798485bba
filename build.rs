//! Makes sure the graph UI's third-party scripts (cytoscape.js and its dagre layout) are
//! present in `ui/node_modules`, fetched from the npm registry as `ui/package-lock.json`
//! pins them, before `src/ui.rs` embeds them. Nothing third-party is committed.

use std::path::Path;
use std::process::Command;

/// What `src/ui.rs` embeds from `ui/node_modules`.
const VENDORED: &[&str] = &[
    "cytoscape/dist/cytoscape.min.js",
    "cytoscape-dagre/dist/cytoscape-dagre.min.js",
];

fn main() {
    commit();
    ui();
}

/// `stacktap --version` names the commit it was built from ("unknown" outside a git
/// checkout, e.g. from a source tarball).
fn commit() {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo::rustc-env=STACKTAP_COMMIT={commit}");
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        println!("cargo::rerun-if-changed={head}");
    }
    if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"])
        && let Some(path) = git(&["rev-parse", "--git-path", &reference])
    {
        println!("cargo::rerun-if-changed={path}");
    }
}

fn ui() {
    let ui = Path::new("ui");
    for f in [
        "package.json",
        "package-lock.json",
        "index.html",
        "app.js",
        "style.css",
    ] {
        println!("cargo::rerun-if-changed=ui/{f}");
    }
    let modules = ui.join("node_modules");
    let installed = modules.join(".package-lock.json");
    let stale = match (
        std::fs::metadata(&installed).and_then(|m| m.modified()),
        std::fs::metadata(ui.join("package-lock.json")).and_then(|m| m.modified()),
    ) {
        (Ok(have), Ok(want)) => have < want,
        _ => true,
    };
    if stale || VENDORED.iter().any(|f| !modules.join(f).is_file()) {
        // the runtime packages only: the UI tests' playwright-core comes from `npm ci` in
        // scripts/setup-deps
        let status = Command::new("npm")
            .args(["ci", "--omit=dev", "--no-audit", "--no-fund"])
            .current_dir(ui)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!(
                "`npm ci` in ui/ failed ({s}): stacktap embeds cytoscape.js from the npm \
                 registry; run scripts/setup-deps or `npm ci` in ui/ and look at its errors"
            ),
            Err(e) => panic!(
                "cannot run npm ({e}): stacktap's build fetches its UI scripts from the npm \
                 registry; install Node.js and npm (scripts/setup-deps does)"
            ),
        }
    }
    for f in VENDORED {
        let p = modules.join(f);
        assert!(p.is_file(), "{} is missing after npm ci", p.display());
        println!("cargo::rerun-if-changed={}", p.display());
    }
}
