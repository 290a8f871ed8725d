// The thread pool: one job at a time, the caller works too and waits only for workers that joined.
// Part of qdot.cpp (one translation unit): included there, in this order.

#pragma once

#include "common.h"

namespace {

// Workers spin for the next job only while a call with several parallel regions is running (the next
// region comes within microseconds), at most OFFLOAD_SPIN_US (default 50) at a time; between calls they
// sleep on a condition variable at once. Spinning past the end of a call took the cores from torch's
// threads: 5x slower decode on a 2-core machine (679 vs 134 ms a token, measured).
int spin_us() {
    static const int us = [] {
        const char* e = std::getenv("OFFLOAD_SPIN_US");
        return e ? std::atoi(e) : 50;
    }();
    return us;
}

class Pool {
   public:
    ~Pool() { resize(1); }

    void resize(int n) {
        {
            std::lock_guard<std::mutex> lk(m_);
            quit_.store(true);
            gen_.fetch_add(1);
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
        workers_.clear();
        quit_.store(false);
        nthreads_ = n < 1 ? 1 : n;
        const uint64_t start = gen_.load();  // a worker that starts late must still see the next job
        chunks_ = std::vector<Chunk>(nthreads_);
        for (int i = 1; i < nthreads_; i++) workers_.emplace_back([this, start, i] { loop(start, i); });
    }

    int threads() const { return nthreads_; }

    // hot: more parallel regions of the same call follow, workers may spin for them
    void hot(bool on) { hot_.store(on, std::memory_order_relaxed); }

    // Runs fn(0..n_items-1) on the caller and whichever workers arrive in time. The caller does not wait
    // for a worker that has not woken (a futex wake-up costs ~0.1-1 ms on a VM, more than a small job):
    // workers join the job through gate_, the caller closes the gate once every item is claimed and
    // then waits only for the workers that joined, each of which finishes the items it claimed.
    void run(int64_t n_items, const std::function<void(int64_t)>& fn) {
        if (nthreads_ == 1 || n_items <= 1) {
            for (int64_t i = 0; i < n_items; i++) fn(i);
            return;
        }
        job_ = &fn;
        for (int c = 0; c < nthreads_; c++) {  // thread c starts on the c-th contiguous share of the items
            chunks_[c].next.store(n_items * c / nthreads_, std::memory_order_relaxed);
            chunks_[c].end = n_items * (c + 1) / nthreads_;
        }
        left_.store(0, std::memory_order_relaxed);
        gate_.store(0, std::memory_order_release);  // open, nobody joined: publishes the job above
        gen_.fetch_add(1);  // seq_cst with sleepers_: a worker going to sleep either sees it or is woken
        if (sleepers_.load() > 0) {
            std::lock_guard<std::mutex> lk(m_);
            cv_.notify_all();
        }
        work(0);
        const uint64_t joined = gate_.fetch_or(CLOSED, std::memory_order_acq_rel) & ~CLOSED;
        for (int spins = 1; (uint64_t)left_.load(std::memory_order_acquire) < joined; spins++) {
            _mm_pause();
            if (spins % 1024 == 0) std::this_thread::yield();  // a joined worker lost its core
        }
    }

   private:
    static constexpr uint64_t CLOSED = 1ull << 62;

    // Each thread walks its own contiguous share of the items in order (one sequential stream of weight
    // rows per core, which the hardware prefetchers follow), then takes what is left of the others'.
    void work(int self) {
        for (int k = 0; k < nthreads_; k++) {
            Chunk& c = chunks_[(self + k) % nthreads_];
            for (int64_t i; (i = c.next.fetch_add(1, std::memory_order_relaxed)) < c.end;) (*job_)(i);
        }
    }

    // join the open job, if any; the job seen then is the one published before the gate opened
    bool join() {
        uint64_t g = gate_.load(std::memory_order_acquire);
        while (!(g & CLOSED))
            if (gate_.compare_exchange_weak(g, g + 1, std::memory_order_acq_rel, std::memory_order_acquire))
                return true;
        return false;
    }

    void loop(uint64_t seen, int self) {
        for (;;) {
            const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us());
            int spins = 0;
            while (gen_.load(std::memory_order_acquire) == seen) {
                _mm_pause();
                if (!hot_.load(std::memory_order_relaxed) ||
                    (++spins % 64 == 0 && std::chrono::steady_clock::now() > until)) {
                    std::unique_lock<std::mutex> lk(m_);
                    sleepers_.fetch_add(1);
                    cv_.wait(lk, [&] { return gen_.load() != seen; });
                    sleepers_.fetch_sub(1);
                }
            }
            seen = gen_.load(std::memory_order_acquire);
            if (quit_.load()) return;
            if (join()) {
                work(self);
                left_.fetch_add(1, std::memory_order_release);  // publishes this worker's results
            }
        }
    }

    std::vector<std::thread> workers_;
    int nthreads_ = 1;
    std::mutex m_;
    std::condition_variable cv_;
    std::atomic<uint64_t> gen_{0};
    struct alignas(64) Chunk {
        std::atomic<int64_t> next{0};
        int64_t end = 0;
    };
    std::vector<Chunk> chunks_ = std::vector<Chunk>(1);
    alignas(64) std::atomic<uint64_t> gate_{CLOSED};  // CLOSED bit | workers joined
    alignas(64) std::atomic<int64_t> left_{0};        // joined workers that finished
    std::atomic<int> sleepers_{0};
    const std::function<void(int64_t)>* job_ = nullptr;
    std::atomic<bool> quit_{false};
    std::atomic<bool> hot_{false};
};

Pool& pool() {
    static Pool p;
    return p;
}
std::mutex call_mutex;  // one caller at a time: the pool runs one job

struct Call {  // holds the pool for one exported call; workers may spin between its regions
    std::lock_guard<std::mutex> lk{call_mutex};
    Call() { pool().hot(true); }
    ~Call() { pool().hot(false); }
};

}  // namespace
