//! The `camex` command-line tool (being written).
fn main() {
    eprintln!("camex: the CLI is not built yet");
    std::process::exit(2);
}
