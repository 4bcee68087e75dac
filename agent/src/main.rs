fn main() -> std::process::ExitCode {
    geminik8s::cli::main()
}
