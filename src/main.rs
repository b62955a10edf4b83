//! The `diffuse` command line: the commands live under `src/cli/`, one file each, over the
//! library.

mod cli;

fn main() {
    cli::main();
}
