fn main() {
    std::process::exit(centralflow::cli::main());
}
