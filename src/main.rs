//! The `diffuse` command line: its commands live in the library ([`diffuse::cli`]), which the
//! Python package parses its keyword arguments with too.

fn main() {
    diffuse::cli::main();
}
