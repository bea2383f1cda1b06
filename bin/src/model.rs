//! `canopy model`: download, list, locate, verify and remove models of the catalogue.
//!
//! A thin front end over [`canopy_store::ModelStore`]: the store does the work and
//! writes the error messages; this module parses arguments, draws progress bars (`indicatif`,
//! on stderr, only when stderr is a terminal) and prints results. Results go to stdout (a path,
//! the table), so `$(canopy model path)` works in scripts.
//!
//! The store directory is `--dir`, else `CANOPY_MODEL_DIR`, else `canopy/models` in the user's
//! cache directory (`~/.cache/canopy/models` on Linux).

use std::path::PathBuf;
use std::time::Duration;

use canopy_store::{DEFAULT_MODEL, ModelStore, Progress, StoreError};
use clap::{Args, Subcommand};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

/// Arguments of `canopy model`.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// The model store directory [default: the user's cache directory, canopy/models].
    #[arg(long, global = true, env = "CANOPY_MODEL_DIR", value_name = "DIR")]
    dir: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    command: ModelCommand,
}

/// The `canopy model` subcommands.
#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Downloads a catalogue model, checks its sha256, and prints its path (nothing is
    /// downloaded if it is already there and intact).
    Pull {
        /// The model's name or alias [default: the default model].
        name: Option<String>,
    },
    /// Lists the catalogue's models, the default first, and which ones are downloaded.
    List,
    /// Deletes a downloaded model.
    Rm {
        /// The model's name or alias.
        name: String,
    },
    /// Prints the file a model name (or path) resolves to; fails if it is not downloaded.
    Path {
        /// A catalogue name or alias, or the path of a GGUF file [default: the default model].
        name: Option<String>,
    },
    /// Checks the sha256 of a downloaded model and prints its path.
    Verify {
        /// The model's name or alias [default: the default model].
        name: Option<String>,
    },
}

/// Runs `canopy model …`.
pub fn run(args: ModelArgs) -> anyhow::Result<()> {
    let store = match args.dir {
        Some(dir) => ModelStore::open(dir),
        None => ModelStore::open_default().map_err(user_error)?,
    };
    let or_default = |name: Option<String>| name.unwrap_or_else(|| DEFAULT_MODEL.to_owned());
    match args.command {
        ModelCommand::Pull { name } => {
            let path = store
                .pull(&or_default(name), &mut BarProgress::default())
                .map_err(user_error)?;
            println!("{}", path.display());
        }
        ModelCommand::List => list(&store)?,
        ModelCommand::Rm { name } => match store.rm(&name).map_err(user_error)? {
            Some(path) => println!("removed {}", path.display()),
            None => println!("model {name} is not downloaded; nothing to remove"),
        },
        ModelCommand::Path { name } => {
            let path = store.resolve(&or_default(name)).map_err(user_error)?;
            println!("{}", path.display());
        }
        ModelCommand::Verify { name } => {
            let path = store
                .verify(&or_default(name), &mut BarProgress::default())
                .map_err(user_error)?;
            println!("ok {}", path.display());
        }
    }
    Ok(())
}

/// Prints the catalogue as a table: name, installed?, size, path, aliases.
fn list(store: &ModelStore) -> anyhow::Result<()> {
    let models = store.list().map_err(user_error)?;
    let mut rows = vec![[
        "NAME".to_owned(),
        "INSTALLED".to_owned(),
        "SIZE".to_owned(),
        "PATH".to_owned(),
        "ALIASES".to_owned(),
    ]];
    for (index, (entry, local)) in models.iter().enumerate() {
        let name = if index == 0 {
            format!("{} (default)", entry.name)
        } else {
            entry.name.clone()
        };
        let (installed, size, path) = match local {
            Some(local) if local.complete => (
                "yes",
                HumanBytes(local.size_bytes).to_string(),
                local.path.display().to_string(),
            ),
            Some(local) => (
                "incomplete",
                format!(
                    "{} of {}",
                    HumanBytes(local.size_bytes),
                    HumanBytes(entry.size_bytes)
                ),
                local.path.display().to_string(),
            ),
            None => (
                "no",
                HumanBytes(entry.size_bytes).to_string(),
                store.path_of(entry).display().to_string(),
            ),
        };
        rows.push([
            name,
            installed.to_owned(),
            size,
            path,
            entry.aliases.join(", "),
        ]);
    }
    let mut widths = [0usize; 5];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in &rows {
        let line = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect::<Vec<_>>()
            .join("  ");
        println!("{}", line.trim_end());
    }
    if models.iter().all(|(_, local)| local.is_none()) {
        // A hint, not a result: stderr keeps stdout parseable.
        eprintln!("\nnothing downloaded yet; run `canopy model pull` for the default model");
    }
    Ok(())
}

/// The store's error as the user-facing message (its text already says what to do; the
/// wrapped OS error is part of it, so no "Caused by" chain is added).
fn user_error(error: StoreError) -> anyhow::Error {
    anyhow::anyhow!("{error}")
}

/// A [`Progress`] drawn with `indicatif` on stderr: a byte bar with speed and ETA when the
/// total is known, a spinner otherwise. Hidden when stderr is not a terminal (the store's own
/// `tracing` lines say what happens then).
#[derive(Default)]
pub(crate) struct BarProgress {
    bar: Option<ProgressBar>,
}

impl Progress for BarProgress {
    fn start(&mut self, total: Option<u64>, message: &str) {
        self.finish();
        let bar = match total {
            Some(total) => ProgressBar::new(total).with_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .map(|style| style.progress_chars("=> "))
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            ),
            None => {
                let spinner = ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                spinner.enable_steady_tick(Duration::from_millis(100));
                spinner
            }
        };
        bar.set_message(message.to_owned());
        self.bar = Some(bar);
    }

    fn advance(&mut self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for BarProgress {
    fn drop(&mut self) {
        self.finish();
    }
}
