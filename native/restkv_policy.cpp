#include "restkv_policy.h"

#include <algorithm>
#include <cmath>
#include <vector>

int32_t restkv_aws_params(double t, int32_t kernel_min, double beta, int32_t * kernel, int32_t * shift) {
    if (kernel == nullptr || shift == nullptr || kernel_min < 1 || !(beta > 0.0) || !std::isfinite(t)) {
        return RESTKV_ERR_BAD_ARG;
    }

    const double q = std::floor(t / beta);

    *kernel = std::max(kernel_min, 2 * (int32_t) std::floor(std::fabs(t) / beta) + 1);
    *shift  = t > 0.0 ? (int32_t) q : (int32_t) q + 1;

    return RESTKV_OK;
}

int32_t restkv_aws_smooth(const float * in, int32_t n, int32_t kernel, int32_t shift, float * out) {
    if (in == nullptr || out == nullptr || n < 0 || kernel < 1) {
        return RESTKV_ERR_BAD_ARG;
    }

    const int32_t half = kernel / 2;

    for (int32_t i = 0; i < n; ++i) {
        double sum = 0.0;
        for (int32_t j = 0; j < kernel; ++j) {
            const int32_t src = std::min(std::max(i + shift - half + j, 0), n - 1);
            sum += in[src];
        }
        out[i] = (float) (sum / kernel);
    }

    return RESTKV_OK;
}

int32_t restkv_max_rank(const float * scores, int32_t n_layer, int32_t n, float * out) {
    if (scores == nullptr || out == nullptr || n_layer < 1 || n < 0) {
        return RESTKV_ERR_BAD_ARG;
    }

    std::fill(out, out + n, 0.0f);
    if (n < 2) {
        return RESTKV_OK;
    }

    std::vector<int32_t> order(n);
    const float inv = 1.0f / (float) (n - 1);

    for (int32_t il = 0; il < n_layer; ++il) {
        const float * row = scores + (int64_t) il * n;

        for (int32_t i = 0; i < n; ++i) {
            order[i] = i;
        }
        std::stable_sort(order.begin(), order.end(), [row](int32_t a, int32_t b) { return row[a] < row[b]; });

        for (int32_t r = 0; r < n; ++r) {
            out[order[r]] = std::max(out[order[r]], (float) r * inv);
        }
    }

    return RESTKV_OK;
}

int32_t restkv_select_evict(const float * score, const uint8_t * keep_always, int32_t n, int32_t n_keep,
                            int32_t * out_evict) {
    if (score == nullptr || out_evict == nullptr || n < 0 || n_keep < 0) {
        return RESTKV_ERR_BAD_ARG;
    }

    if (n_keep >= n) {
        return 0;
    }

    // protected cells first, then by descending score, then by index for a deterministic order
    std::vector<int32_t> order(n);
    for (int32_t i = 0; i < n; ++i) {
        order[i] = i;
    }
    auto protected_cell = [keep_always](int32_t i) { return keep_always != nullptr && keep_always[i] != 0; };
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
        if (protected_cell(a) != protected_cell(b)) {
            return protected_cell(a);
        }
        if (score[a] != score[b]) {
            return score[a] > score[b];
        }
        return a < b;
    });

    std::vector<uint8_t> evict(n, 0);
    for (int32_t r = n_keep; r < n; ++r) {
        // more protected cells than n_keep: they all stay
        evict[order[r]] = !protected_cell(order[r]);
    }

    int32_t n_evict = 0;
    for (int32_t i = 0; i < n; ++i) {
        if (evict[i]) {
            out_evict[n_evict++] = i;
        }
    }

    return n_evict;
}

int32_t restkv_cell_scores(const float * scores, const float * tpos, int32_t n_layer, int32_t n_head,
                           int32_t n_head_kv, int32_t n, int32_t kernel_min, double beta, int32_t aggregate,
                           float * out, int32_t * kernels, int32_t * shifts) {
    if (scores == nullptr || tpos == nullptr || out == nullptr || n_layer < 1 || n_head < 1 || n_head_kv < 1 ||
        n_head % n_head_kv != 0 || n < 0 || kernel_min < 1 || !(beta > 0.0) ||
        (aggregate != RESTKV_AGG_MAX_RANK && aggregate != RESTKV_AGG_MEAN)) {
        return RESTKV_ERR_BAD_ARG;
    }

    const int32_t g = n_head/n_head_kv;

    std::vector<float> layer_scores((size_t) n_layer*n, 0.0f);
    std::vector<float> smooth(n);

    for (int32_t il = 0; il < n_layer; ++il) {
        float * dst = layer_scores.data() + (size_t) il*n;
        for (int32_t h = 0; h < n_head; ++h) {
            const size_t lh = (size_t) il*n_head + h;
            const float front = tpos[2*lh + 0];
            const float rear  = tpos[2*lh + 1];

            int32_t kernel = kernel_min;
            int32_t shift  = 0;
            if (!std::isnan(front) && !std::isnan(rear)) {
                restkv_aws_params((double) front - (double) rear, kernel_min, beta, &kernel, &shift);
            }
            if (kernels) {
                kernels[lh] = kernel;
            }
            if (shifts) {
                shifts[lh] = shift;
            }

            restkv_aws_smooth(scores + lh*n, n, kernel, shift, smooth.data());

            // mean over the g query heads of a KV head, summed over KV heads: sum / g
            for (int32_t i = 0; i < n; ++i) {
                dst[i] += smooth[i]/(float) g;
            }
        }
    }

    if (aggregate == RESTKV_AGG_MAX_RANK) {
        return restkv_max_rank(layer_scores.data(), n_layer, n, out);
    }

    std::fill(out, out + n, 0.0f);
    for (int32_t il = 0; il < n_layer; ++il) {
        const float * row = layer_scores.data() + (size_t) il*n;
        double sum = 0.0;
        for (int32_t i = 0; i < n; ++i) {
            sum += row[i];
        }
        const float inv = sum > 0.0 ? (float) (1.0/(sum*n_layer)) : 0.0f;
        for (int32_t i = 0; i < n; ++i) {
            out[i] += row[i]*inv;
        }
    }
    return RESTKV_OK;
}
