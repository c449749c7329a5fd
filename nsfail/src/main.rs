fn main() -> std::process::ExitCode {
    nsfail::cli::main()
}
