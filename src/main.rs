// glibc malloc was a quarter of shard CPU in the pipeline profile (fastbin consolidation,
// frees on other threads than the allocating one); mimalloc took the pipeline from 45k to
// 72k transitions/s per shard in the same run (bench/README.md, "Shard pipeline").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    runner::cli::main()
}
