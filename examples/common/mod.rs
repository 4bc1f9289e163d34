//! What the examples share: which lock store they run on.

use anyhow::{bail, Context};

/// The store URL from `--url URL`, by default the embedded driver. A bare `mem://` is a private store
/// for each `connect`, while an example's clients connect one by one as separate programs would, so
/// it becomes `mem://EXAMPLE`, one store that all of them share.
pub fn store_url(example: &str) -> anyhow::Result<String> {
    let mut args = std::env::args().skip(1);
    let mut url = "mem://".to_owned();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--url" => {
                url = args
                    .next()
                    .context("--url needs a value, e.g. --url redis://127.0.0.1:6379")?
            }
            "-h" | "--help" => {
                println!("usage: {example} [--url URL]   (default mem://, the in-memory driver)");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; usage: {example} [--url URL]"),
        }
    }
    Ok(if url == "mem://" {
        format!("mem://{example}")
    } else {
        url
    })
}
