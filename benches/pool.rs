//! Pool checkout/return, uncontended and under contention (64 tasks on a
//! 2-thread runtime sharing 8 connections). Run: `cargo bench --bench pool`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use loopmux::upstream::pool::{Acquired, Pool, PoolConfig, Reusable};

struct Conn;

impl Reusable for Conn {
    fn is_usable(&self) -> bool {
        true
    }
}

fn pool(max: usize) -> Pool<Conn> {
    Pool::new(PoolConfig {
        max_connections: max,
        max_pending: 100_000,
        queue_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(600),
        max_lifetime: Duration::from_secs(3600),
        multiplexed: false,
    })
}

async fn cycle(p: &Pool<Conn>) {
    let c = match p.checkout().await {
        Ok(Acquired::Reused(c)) => c,
        Ok(Acquired::Dial(s)) => s.fill(Conn),
        Err(e) => panic!("{e}"),
    };
    drop(c);
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let mut g = c.benchmark_group("pool");
    g.throughput(Throughput::Elements(1));
    g.bench_function("checkout_return_uncontended", |b| {
        let p = pool(8);
        b.to_async(&rt).iter(|| cycle(&p));
    });

    const PER_TASK: u64 = 200;
    for tasks in [8u64, 64] {
        g.throughput(Throughput::Elements(tasks * PER_TASK));
        g.bench_with_input(
            BenchmarkId::new("checkout_return_contended_cap8", tasks),
            &tasks,
            |b, &tasks| {
                let p = pool(8);
                b.to_async(&rt).iter(|| {
                    let p = p.clone();
                    async move {
                        let mut hs = Vec::with_capacity(tasks as usize);
                        for _ in 0..tasks {
                            let p = p.clone();
                            hs.push(tokio::spawn(async move {
                                for _ in 0..PER_TASK {
                                    cycle(&p).await;
                                }
                            }));
                        }
                        for h in hs {
                            h.await.unwrap();
                        }
                    }
                });
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
