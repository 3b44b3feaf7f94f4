# Reference numbers for tests/test_r_live.py, computed by R itself.
# Usage: Rscript tests/r/live_check.R CONFIG.json OUT.json
# CONFIG names the CSV and its columns; every block is optional:
#   {"csv", "time", "event", "group", "score", "covariates": [..], "times": [..],
#    "td_auc_times": [..], "label", "scores": [..], "unpaired": {"score", "split"}, "prob"}
suppressPackageStartupMessages({
  library(jsonlite); library(survival); library(maxstat); library(pROC); library(mvtnorm)
})
args <- commandArgs(trailingOnly = TRUE)
cfg <- fromJSON(args[1], simplifyVector = TRUE)
d <- read.csv(cfg$csv, stringsAsFactors = FALSE)
out <- list(versions = list(R = R.version.string,
                            survival = as.character(packageVersion("survival")),
                            maxstat = as.character(packageVersion("maxstat")),
                            pROC = as.character(packageVersion("pROC"))))

# coxph converged as tightly as ours (R's default eps = 1e-9 on the log-likelihood leaves
# a coefficient up to ~1e-5 off on flat likelihoods, e.g. few events)
tight <- coxph.control(eps = 1e-12, iter.max = 100)

logrank <- function(f, data) {
  s <- survdiff(f, data = data)
  df <- sum(s$n > 0) - 1
  list(statistic = s$chisq, df = df, p = pchisq(s$chisq, df, lower.tail = FALSE))
}

if (!is.null(cfg$time)) {
  S <- Surv(d[[cfg$time]], d[[cfg$event]])
  if (!is.null(cfg$group)) {
    g <- factor(d[[cfg$group]])
    out$survdiff <- logrank(S ~ g, data.frame(g = g))
    # survfit(..., conf.type = "log-log") at chosen times, per group (sorted level names)
    fit <- survfit(S ~ g, conf.type = "log-log")
    sm <- summary(fit, times = cfg$times, extend = TRUE)
    strata <- sub("^g=", "", as.character(sm$strata))
    out$survfit <- lapply(levels(g), function(l) {
      k <- strata == l
      list(group = l, time = sm$time[k], n_risk = sm$n.risk[k], surv = sm$surv[k],
           lower = sm$lower[k], upper = sm$upper[k])
    })
  }
  if (!is.null(cfg$covariates)) {
    f <- as.formula(paste("S ~", paste(cfg$covariates, collapse = " + ")))
    cx <- coxph(f, data = d, ties = "efron", control = tight)
    sc <- summary(cx)
    out$coxph <- list(name = rownames(sc$coefficients), coef = unname(coef(cx)),
                      se = unname(sqrt(diag(vcov(cx)))),
                      p = unname(sc$coefficients[, "Pr(>|z|)"]),
                      concordance = unname(sc$concordance[1]))
    # cox.zph(fit): the survival >= 3.0 score test, transform = "km", one row per term
    z <- cox.zph(cx)$table
    out$coxzph <- list(term = rownames(z), chisq = unname(z[, "chisq"]),
                       df = unname(z[, "df"]), p = unname(z[, "p"]))
  }
  if (!is.null(cfg$score)) {
    x <- d[[cfg$score]]
    ms <- list()
    for (pm in c("Lau92", "Lau94", "exactGauss")) {
      extra <- list()
      if (pm == "exactGauss") {
        # Miwa is exact up to its quadrature for up to 20 cuts; beyond, GenzBretz (random)
        extra$algorithm <- if (length(maxstat.test(S ~ x, data = data.frame(x = x),
                                 smethod = "LogRank", pmethod = "none")$cuts) <= 20)
          Miwa(steps = 4096) else GenzBretz(maxpts = 2e6, abseps = 1e-6, releps = 0)
      }
      set.seed(1)
      m <- do.call(maxstat.test, c(list(S ~ x, data = data.frame(x = x), smethod = "LogRank",
                                        pmethod = pm, minprop = 0.1, maxprop = 0.9), extra))
      ms[[pm]] <- as.numeric(m$p.value)
      if (pm == "exactGauss") exact_error <- attr(m$p.value, "error")
    }
    out$maxstat <- list(statistic = unname(m$statistic), estimate = unname(m$estimate),
                        cuts = m$cuts, stats = m$stats, p = ms,
                        n_low = sum(x <= m$estimate),
                        exact_algorithm = if (length(m$cuts) <= 20) "Miwa" else "GenzBretz",
                        exact_error = if (is.null(exact_error)) NA else exact_error)
    hi <- factor(ifelse(x > m$estimate, "high", "low"))
    out$maxstat_groups <- logrank(S ~ hi, data.frame(hi = hi))
    cx <- coxph(S ~ I(hi == "high"), ties = "efron", control = tight)
    out$maxstat_cox <- list(hr = unname(exp(coef(cx))),
                            ci = unname(exp(confint(cx))[1, ]),
                            p = unname(summary(cx)$coefficients[1, "Pr(>|z|)"]))
  }
}

if (!is.null(cfg$td_auc_times)) {
  # time-dependent AUC of the score, cumulative/dynamic with IPCW, written out (no R package
  # of it is installed here): scikit-survival's cumulative_dynamic_auc(y, y, score, times):
  # censoring Kaplan-Meier G with deaths leaving the risk set before censorings at a tied
  # time, G at the case's own time; ties in the score count 1/2; the mean weights AUC(t_k)
  # by the Kaplan-Meier drop S(t_{k-1}) - S(t_k), over 1 - S(t_last)
  time <- d[[cfg$time]]; status <- d[[cfg$event]]; score <- d[[cfg$score]]
  times <- sort(unique(cfg$td_auc_times))
  ut <- sort(unique(time))
  n_at <- sapply(ut, function(u) sum(time >= u))
  dd <- sapply(ut, function(u) sum(time == u & status == 1))
  cens <- sapply(ut, function(u) sum(time == u & status == 0))
  G <- cumprod(ifelse(cens > 0, 1 - cens / (n_at - dd), 1))
  w <- ifelse(status == 1, 1 / G[match(time, ut)], 0)
  auc <- sapply(times, function(t) {
    case <- which(time <= t & status == 1); ctrl <- score[time > t]
    sum(sapply(case, function(i) w[i] * (sum(score[i] > ctrl) + 0.5 * sum(score[i] == ctrl)))) /
      (sum(w[case]) * length(ctrl))
  })
  S <- summary(survfit(Surv(time, status) ~ 1), times = times, extend = TRUE)$surv
  out$td_auc <- list(times = times, auc = auc, mean_auc = if (length(times) == 1) auc else
                       sum(auc * -diff(c(1, S))) / (1 - S[length(S)]))
}

wilson <- function(k, n, z = qnorm(0.975)) {
  # Wilson score interval, written out (equals prop.test(k, n, correct = FALSE)$conf.int)
  p <- k / n
  centre <- (p + z^2 / (2 * n)) / (1 + z^2 / n)
  half <- z / (1 + z^2 / n) * sqrt(p * (1 - p) / n + z^2 / (4 * n^2))
  c(centre - half, centre + half)
}

if (!is.null(cfg$label)) {
  y <- d[[cfg$label]]
  rocs <- lapply(cfg$scores, function(s)
    roc(y, d[[s]], levels = c(0, 1), direction = "<", quiet = TRUE))
  names(rocs) <- cfg$scores
  out$roc <- lapply(cfg$scores, function(s) {
    r <- rocs[[s]]
    ci <- ci.auc(r, method = "delong")
    b <- coords(r, "best", best.method = "youden", transpose = FALSE,
                ret = c("threshold", "sensitivity", "specificity", "ppv", "npv",
                        "tp", "fn", "tn", "fp"))
    if (nrow(b) > 1) b <- b[1, ]
    list(score = s, auc = as.numeric(r$auc), ci_low = max(0, ci[1]), ci_high = min(1, ci[3]),
         threshold = b$threshold, sensitivity = b$sensitivity, specificity = b$specificity,
         ppv = b$ppv, npv = b$npv,
         sensitivity_ci = wilson(b$tp, b$tp + b$fn), specificity_ci = wilson(b$tn, b$tn + b$fp))
  })
  if (length(cfg$scores) >= 2) {
    pairs <- combn(cfg$scores, 2, simplify = FALSE)
    out$roc_test <- lapply(pairs, function(p) {
      t <- roc.test(rocs[[p[1]]], rocs[[p[2]]], method = "delong", paired = TRUE)
      list(score_a = p[1], score_b = p[2], z = unname(t$statistic), p = t$p.value,
           diff_ci = as.numeric(t$conf.int))
    })
  }
  if (!is.null(cfg$unpaired)) {
    s <- d[[cfg$unpaired$score]]; split <- d[[cfg$unpaired$split]]
    lv <- sort(unique(split))
    ra <- roc(y[split == lv[1]], s[split == lv[1]], levels = c(0, 1), direction = "<", quiet = TRUE)
    rb <- roc(y[split == lv[2]], s[split == lv[2]], levels = c(0, 1), direction = "<", quiet = TRUE)
    t <- roc.test(ra, rb, method = "delong", paired = FALSE)
    out$roc_unpaired <- list(levels = lv, z = unname(t$statistic), p = t$p.value)
  }
}

if (!is.null(cfg$prob)) {
  # calibration intercept and slope: glm(y ~ lp) and glm(y ~ 1, offset = lp), lp = logit(p),
  # Wald intervals (confint.default), converged tightly
  y <- d[[cfg$label]]; lp <- qlogis(d[[cfg$prob]])
  ctl <- glm.control(epsilon = 1e-14, maxit = 100)
  sl <- glm(y ~ lp, family = binomial, control = ctl)
  it <- glm(y ~ 1, offset = lp, family = binomial, control = ctl)
  out$calibration <- list(slope = unname(coef(sl)[2]), slope_ci = unname(confint.default(sl)[2, ]),
                          intercept = unname(coef(it)[1]),
                          intercept_ci = unname(confint.default(it)[1, ]))
}

write_json(out, args[2], digits = NA, auto_unbox = TRUE)
